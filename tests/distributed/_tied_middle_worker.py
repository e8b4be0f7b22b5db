"""torchrun, 3 processes: PP=3 with a tied exit on the middle stage vs a PP=1 reference built in-process.

Every rank first builds the whole model at PP=1 (same seed, so the same weights everywhere) and
computes reference gradients with plain autograd; then it rebuilds its PP=3 stage from those weights
and runs megatron's 1F1B schedule. The stage's gradients must equal the reference's.
"""
import json
import re
import sys

import torch


def main(out_path: str) -> None:
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.models.losses import masked_sum, weighted_exit_sum
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.parallel.optimizer import wrap_ddp
    from nemo_ee.parallel.schedules import ExitLossRecorder, run_forward_backward

    arch = dict(num_layers=6, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                seq_length=8, exit_layer_nums=[1, 3, 5], tie_exit_output=True, exit_loss_weights=[0.3, 0.5, 0.7])
    weights = [0.3, 0.5, 0.7]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 9), generator=g)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
             "position_ids": torch.arange(8).expand(2, 8)}

    # ---- reference: the whole model on every rank (TP=1, PP=1, data-parallel world of 3)
    initialize_distributed(1, 1, seed=5)
    torch.manual_seed(11)
    ref = build_model(EarlyExitConfig(**arch))
    out = ref(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    n = mask.sum()
    loss = (masked_sum(out.output, mask) + weighted_exit_sum(out.exits, weights, mask)) / n
    loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
    ref_state = {k: v.clone() for k, v in ref.state_dict().items() if isinstance(v, torch.Tensor)}
    ref_losses = {"final": float(masked_sum(out.output, mask) / n),
                  **{f"exit{i}": float(masked_sum(out.exits[i], mask) / n) for i in range(3)}}

    # ---- the PP=3 stage
    cfg = EarlyExitConfig(**arch, pipeline_model_parallel_size=3)
    initialize_distributed(1, 3, seed=5, embedding_stages=cfg.embedding_stages)
    stage = build_model(cfg)
    offset = stage.layer_offset

    def ref_key(key: str) -> str:
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
        if m:
            return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}"
        if key in ("exit_word_embeddings", "output_layer.weight"):
            return "embedding.word_embeddings.weight"
        return key

    own = stage.state_dict()
    copied_ok = True
    if stage.exit_word_embeddings is not None:  # filled by megatron's all-reduce from stage 0 at build
        copied_ok = bool(torch.equal(stage.exit_word_embeddings.data,
                                     torch.zeros_like(stage.exit_word_embeddings.data))) is False
    stage.load_state_dict({k: ref_state[ref_key(k)] for k, v in own.items() if isinstance(v, torch.Tensor)},
                          strict=False)
    ddp = wrap_ddp(stage)
    recorder = ExitLossRecorder(3)
    run_forward_backward([ddp], [batch], weights, recorder, ddp.config, 8)
    diffs = {}
    for name, p in stage.named_parameters():
        expected = ref_grads[ref_key(name)]
        diffs[name] = float((p.main_grad - expected).abs().max() / (expected.abs().max() + 1e-12))
    rank = torch.distributed.get_rank()
    with open(f"{out_path}.{rank}.json", "w") as f:
        json.dump(dict(rank=rank, local_exits=stage.local_exit_indices, middle_copy=stage.exit_word_embeddings is not None,
                       copied_from_stage0=copied_ok, rel_grad_diff=diffs, losses=recorder.reduce(),
                       ref_losses=ref_losses), f)


if __name__ == "__main__":
    main(sys.argv[1])
