"""Early-exit GPT on megatron-core: exit heads, the model, the multi-exit loss, the NeMo wrapper."""
from nemo_ee.compat import cpu as _cpu
from nemo_ee.compat import mcore as _mcore

_mcore.check_version()  # a clear error on an unsupported megatron-core, before anything is built
_cpu.apply()  # before any megatron module runs; a no-op when CUDA is available

from nemo_ee.models.early_exit_gpt import EarlyExitGPTModel, EarlyExitOutput, build_model  # noqa: E402
from nemo_ee.models.exit_head import ExitHead  # noqa: E402

__all__ = ["EarlyExitGPTModel", "EarlyExitOutput", "ExitHead", "build_model"]
