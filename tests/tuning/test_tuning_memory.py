"""EE-Tuning costs less than full fine-tuning: memory and step time, same model and batch (exit at L/2)."""
import statistics
import time

import torch

from nemo_ee.config import EarlyExitConfig

L, H, HEADS, V, S, B = 8, 128, 4, 1024, 128, 1
EXITS = [L // 4, L // 2]


def test_memory_helpers_count_exactly():
    from nemo_ee.tuning.memory import SavedTensorCounter, param_bytes, step_memory

    lin = torch.nn.Linear(4, 3)
    counter = SavedTensorCounter(lin)
    x = torch.randn(5, 4)
    with counter.hooks():
        lin(x).relu().sum()
    # linear saves its input x (80 B; the weight is a parameter, not counted); relu saves its output (60 B)
    assert counter.nbytes == 5 * 4 * 4 + 5 * 3 * 4
    assert param_bytes(lin.parameters()) == (12 + 3) * 4
    assert step_memory(lin.parameters(), [lin.bias], 100) == {"params": 60, "grads": 12, "adam": 24,
                                                              "saved_activations": 100}


def test_ee_tuning_step_is_cheaper_than_full_fine_tuning(single_process):
    from nemo_ee.models import build_model
    from nemo_ee.tuning.ee_tune import EETuner, build_truncated_model
    from nemo_ee.tuning.memory import SavedTensorCounter, step_flops_per_token, step_memory

    cfg = EarlyExitConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS, vocab_size=V, seq_length=S,
                          exit_layer_nums=EXITS, transformer_impl="local")
    torch.manual_seed(0)
    full = build_model(cfg).train()
    ee_model = build_truncated_model(cfg, full.state_dict()).train()  # what EE-Tuning builds: layers 1..L/2
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S)
    mask = torch.ones(B, S)

    tuner = EETuner(ee_model, lr=1e-5, clip_grad=0.0)
    full_params = list(full.parameters())
    full_opt = torch.optim.AdamW(full_params, lr=1e-5)

    def ee_step(counter=None):
        if counter is None:
            tuner.step(tokens, labels, mask, pos)
            return
        with counter.hooks():
            tuner.step(tokens, labels, mask, pos)

    def full_step(counter=None):
        full_opt.zero_grad(set_to_none=True)
        with counter.hooks() if counter else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = full(tokens, pos, None, labels=labels)
            loss = (out.output.sum() + sum(e.sum() for e in out.exits.values())) / mask.sum()
        loss.backward()
        full_opt.step()

    ee_counter, full_counter = SavedTensorCounter(ee_model), SavedTensorCounter(full)
    ee_step(ee_counter)
    full_step(full_counter)
    ee_mem = step_memory(ee_model.parameters(), tuner.params, ee_counter.nbytes)
    full_mem = step_memory(full_params, full_params, full_counter.nbytes)
    memory_ratio = sum(ee_mem.values()) / sum(full_mem.values())
    # the EE model holds half the layers and no output layer; it trains only the exits; autograd saves exit
    # activations only (the backbone runs under no_grad)
    assert ee_mem["params"] < 0.75 * full_mem["params"]
    assert ee_mem["saved_activations"] < 0.5 * full_mem["saved_activations"]
    assert memory_ratio < 0.6, (ee_mem, full_mem)

    times = {"ee": [], "full": []}
    for i in range(12):  # alternated, so a busy machine slows both kinds alike; the first pair is warm-up
        for kind, fn in (("ee", ee_step), ("full", full_step)):
            t0 = time.perf_counter()
            fn()
            if i:
                times[kind].append(time.perf_counter() - t0)
    time_ratio = statistics.median(times["ee"]) / statistics.median(times["full"])
    ee_flops, full_flops = step_flops_per_token(L, H, S, V, EXITS, max(EXITS))
    predicted = ee_flops / full_flops  # 0.255 at this shape
    print(f"memory_ratio={memory_ratio:.3f} time_ratio={time_ratio:.3f} predicted_time_ratio={predicted:.3f}")
    assert 0.2 < predicted < 0.3
    # 2.4x the FLOPs prediction of head-room for scheduling noise on a loaded 2-core machine: still well
    # below 1, i.e. an EE-Tuning step is clearly faster than a full fine-tuning step
    assert time_ratio < 0.6, (time_ratio, times)
