"""The CUDA->CPU shim of nemo_ee.compat.cpu: scope (megatron modules only), RNG tracker, buffers, clipping."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nemo_ee.models  # noqa: F401  (applies the shim)
from nemo_ee.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op when CUDA is available")


def _module(name):
    import importlib

    return importlib.import_module(name)


# ---------------------------------------------------------------- applied, idempotent, scoped
def test_applied_after_importing_models():
    assert cpu.is_applied()


def test_apply_is_idempotent():
    before = {name: getattr(_module(name), "torch", None) for name in cpu.PATCHED_MODULES}
    assert cpu.apply() is True
    assert cpu.apply() is True
    after = {name: getattr(_module(name), "torch", None) for name in cpu.PATCHED_MODULES}
    for name in cpu.PATCHED_MODULES:
        assert after[name] is before[name], name


def test_every_patched_module_holds_the_proxy():
    proxies = set()
    patched = 0
    for name in cpu.PATCHED_MODULES:
        module = _module(name)
        if not hasattr(module, "torch"):
            continue
        assert module.torch is not torch, f"{name}.torch is still the real torch"
        assert isinstance(module.torch, cpu._TorchOnCpu), name
        proxies.add(id(module.torch))
        patched += 1
    assert patched > 0
    assert len(proxies) == 1  # one proxy shared by all the patched modules


def test_global_torch_is_untouched():
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    t = torch.zeros(1, device="cpu")
    assert t.device.type == "cpu" and t.item() == 0.0
    assert type(torch.device("cpu")) is torch.device
    assert not isinstance(torch, cpu._TorchOnCpu)


def test_proxy_maps_cuda_to_cpu():
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.utils as mutils

    assert mrandom.torch.cuda.current_device() == "cpu"
    assert mutils.torch.zeros(2, device="cuda").device.type == "cpu"
    assert mutils.torch.empty(3, device=0).device.type == "cpu"
    assert mutils.torch.ones(2, device=torch.device("cuda")).device.type == "cpu"
    t = mutils.torch.tensor([1], device="cuda", pin_memory=True)
    assert t.device.type == "cpu"
    assert not t.is_pinned()
    assert t.tolist() == [1]
    assert mutils.torch.device("cuda", 0) == torch.device("cpu")
    assert mutils.torch.device("cuda:1") == torch.device("cpu")
    assert mutils.torch.device("cpu") == torch.device("cpu")
    assert isinstance(torch.device("cpu"), mutils.torch.device)
    # everything else forwards to the real torch
    assert mutils.torch.float32 is torch.float32
    assert mutils.torch.nn is torch.nn
    assert mutils.torch.cuda.is_available() is False


# ---------------------------------------------------------------- RNG tracker
def _draw_in_fork(n=8):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        return torch.rand(n)


def test_rng_tracker_fork_reproducible_and_restores_cpu_state(single_process):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    first = _draw_in_fork()
    second = _draw_in_fork()
    assert not torch.equal(first, second)  # the forked stream advances

    # reset tracker + reseed -> the same forked numbers
    get_cuda_rng_tracker().reset()
    model_parallel_cuda_manual_seed(123)
    assert torch.equal(_draw_in_fork(), first)
    assert torch.equal(_draw_in_fork(), second)

    # the default (CPU) generator is restored when the fork exits, and differs from the forked stream
    state = torch.get_rng_state()
    forked = _draw_in_fork()
    assert torch.equal(torch.get_rng_state(), state)
    default = torch.rand(8)
    assert not torch.equal(forked, default)
    torch.set_rng_state(state)
    assert torch.equal(torch.rand(8), default)

    # another seed -> other forked numbers
    model_parallel_cuda_manual_seed(124)
    assert not torch.equal(_draw_in_fork(), first)


def test_global_memory_buffer_is_on_cpu(single_process):
    from megatron.core import parallel_state

    t = parallel_state.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "nemo_ee_test")
    assert t.device.type == "cpu"
    assert t.shape == (2, 3) and t.dtype == torch.float32


# ---------------------------------------------------------------- grad clipping
def _params_with_grads(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def test_clip_is_patched_in_both_modules():
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    assert clip_grads.clip_grad_by_total_norm_fp32 is cpu._clip_grad_by_total_norm_fp32
    assert optimizer.clip_grad_by_total_norm_fp32 is cpu._clip_grad_by_total_norm_fp32


def test_clip_scales_when_coefficient_below_one():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    grads = [torch.tensor([3.0, -4.0]), torch.tensor([[1.0, 2.0], [0.5, -0.25]])]
    params = _params_with_grads(grads)
    total_norm, max_norm = 10.0, 2.0
    clip_grad_by_total_norm_fp32(params, max_norm, total_norm)
    coeff = max_norm / (total_norm + 1.0e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * coeff, rtol=0, atol=0)


def test_clip_single_tensor_argument():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    (p,) = _params_with_grads([torch.tensor([1.0, 1.0])])
    clip_grad_by_total_norm_fp32(p, 1.0, 4.0)
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 1.0]) * (1.0 / (4.0 + 1.0e-6)), rtol=0, atol=0)


@pytest.mark.parametrize("max_norm,total_norm", [(5.0, 1.0), (1.0, 1.0 - 1.0e-6), (3.0, 3.0 - 1.0e-6)])
def test_clip_leaves_grads_when_coefficient_at_least_one(max_norm, total_norm):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    assert max_norm / (total_norm + 1.0e-6) >= 1.0
    grads = [torch.tensor([3.0, -4.0])]
    params = _params_with_grads(grads)
    clip_grad_by_total_norm_fp32(params, max_norm, total_norm)
    assert torch.equal(params[0].grad, grads[0])


def test_clip_skips_params_without_grad():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p_none = torch.nn.Parameter(torch.ones(2))
    (p,) = _params_with_grads([torch.tensor([2.0])])
    clip_grad_by_total_norm_fp32([p_none, p], 1.0, 2.0)
    assert p_none.grad is None
    torch.testing.assert_close(p.grad, torch.tensor([2.0]) * (1.0 / (2.0 + 1.0e-6)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_clip_rejects_non_fp32_grads(dtype):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    params = _params_with_grads([torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=dtype)])
    with pytest.raises(TypeError):
        clip_grad_by_total_norm_fp32(params, 1.0, 10.0)
    # nothing was scaled before the error
    assert torch.equal(params[0].grad, torch.ones(2))


# ---------------------------------------------------------------- nothing patched before nemo_ee.models/.parallel
def test_not_applied_until_models_or_parallel_imported():
    """One fresh interpreter (keeps the suite fast): plain imports patch nothing; models and parallel apply."""
    code = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("ignore")
        import torch
        import nemo_ee.config
        import megatron.core.utils
        import megatron.core.tensor_parallel.random as mrandom
        import nemo_ee.compat.cpu as cpu
        assert megatron.core.utils.torch is torch
        assert mrandom.torch is torch
        assert not cpu.is_applied()
        callers = []
        real_apply = cpu.apply
        def apply():
            callers.append(sys._getframe(1).f_globals["__name__"])
            return real_apply()
        cpu.apply = apply
        import nemo_ee.parallel
        assert cpu.is_applied()
        assert megatron.core.utils.torch is not torch
        assert megatron.core.utils.torch.zeros(1, device="cuda").device.type == "cpu"
        import nemo_ee.models
        assert callers == ["nemo_ee.parallel", "nemo_ee.models"], callers
        print("OK")
        """
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK")


def test_megatron_core_version_range(monkeypatch):
    from packaging.version import Version

    from nemo_ee.compat import mcore

    mcore.check_version()  # the installed (pinned) megatron-core is supported
    monkeypatch.setattr(mcore, "MCORE_VERSION", Version("0.15.2"))
    with pytest.raises(ImportError, match=r"megatron-core 0.15.2 is not supported by nemo_ee \(supported: >=0.16.0,<0.20.0\)"):
        mcore.check_version()
