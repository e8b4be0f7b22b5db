"""Run under torchrun with 2 processes: PP=2 training step with exits on both stages (gloo, CPU)."""
import json
import sys

import torch


def main(out_path: str) -> None:
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.parallel.optimizer import OptimSettings, build_optimizer, wrap_ddp
    from nemo_ee.parallel.schedules import ExitLossRecorder, run_forward_backward, split_microbatches

    cfg = EarlyExitConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                          seq_length=8, pipeline_model_parallel_size=2, exit_layer_nums=[1, 3],
                          exit_loss_weights=[0.5, 0.5])
    initialize_distributed(1, 2, seed=1)
    rank = torch.distributed.get_rank()
    model = build_model(cfg)
    ddp = wrap_ddp(model)
    opt = build_optimizer(ddp, OptimSettings(clip_grad=0.0), max_steps=10)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (4, 9), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(4, 8),
             "position_ids": torch.arange(8).expand(4, 8)}
    recorder = ExitLossRecorder(cfg.num_exits)
    ddp.zero_grad_buffer()
    run_forward_backward([ddp], split_microbatches(batch, 2), [0.5, 0.5], recorder, ddp.config, 8)
    exit_grad = {k: float(p.main_grad.abs().sum()) for k, p in model.exits.named_parameters()}
    layer_grad = [float(sum(p.main_grad.abs().sum() for p in layer.parameters())) for layer in model.decoder.layers]
    result = dict(rank=rank, local_exits=model.local_exit_indices, losses=recorder.reduce(),
                  exit_grad=exit_grad, layer_grad=layer_grad, pre=model.pre_process, post=model.post_process)
    with open(f"{out_path}.{rank}.json", "w") as f:
        json.dump(result, f)
    opt.step()


if __name__ == "__main__":
    main(sys.argv[1])
