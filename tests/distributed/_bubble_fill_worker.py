"""torchrun, 2 processes, PP=2: bubble filling against the plain 1F1B schedule."""
import json
import sys

import torch


def main(out_path: str) -> None:
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.models.losses import weighted_exit_sum
    from nemo_ee.parallel.bubble_fill import pipeline_with_bubble_fill
    from nemo_ee.parallel.initialize import initialize_distributed
    from nemo_ee.parallel.optimizer import wrap_ddp
    from nemo_ee.parallel.schedules import ExitLossAutoScaler, ExitLossRecorder, make_forward_step, run_forward_backward

    cfg = EarlyExitConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
                          seq_length=8, pipeline_model_parallel_size=2, exit_layer_nums=[1, 3],
                          exit_loss_weights=[0.4, 0.6], exit_mlp=True)
    weights = [0.4, 0.6]
    initialize_distributed(1, 2, seed=3)
    torch.manual_seed(3)
    model = build_model(cfg)
    ddp = wrap_ddp(model)
    g = torch.Generator().manual_seed(1)

    def batch(n):
        t = torch.randint(0, 64, (n, 9), generator=g)
        return {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(n, 8),
                "position_ids": torch.arange(8).expand(n, 8)}

    micro = [batch(2) for _ in range(3)]
    fills = [batch(2) for _ in range(2)]
    grads = lambda: {k: p.main_grad.clone() for k, p in model.named_parameters()}  # noqa: E731

    def run(**kw):
        ddp.zero_grad_buffer()
        rec = ExitLossRecorder(2)
        run_forward_backward([ddp], micro, weights, rec, ddp.config, 8, **kw)
        return grads(), rec.reduce()

    plain, plain_losses = run()
    # our communicator with nothing to fill: bit-identical to the plain schedule
    ddp.zero_grad_buffer()
    rec = ExitLossRecorder(2)
    fwd = make_forward_step(weights, rec, ddp.config, len(micro))
    comm = pipeline_with_bubble_fill(fwd, [ddp], micro, [], weights, rec, ExitLossAutoScaler.scale, 8)
    no_fill = grads()
    filled, filled_losses = run(fill_microbatches=fills)

    # the same fill work by hand: first-stage exit losses, scaled like a regular micro-batch
    ddp.zero_grad_buffer()
    calls = []
    hook = model.decoder.layers[1].register_forward_hook(lambda *a: calls.append(1))
    if model.pre_process:
        for b in fills:
            exits = model.forward_exits_only(b["tokens"], b["position_ids"], b["labels"])
            loss = weighted_exit_sum(exits, weights, b["loss_mask"]) / b["loss_mask"].sum()
            (loss * ExitLossAutoScaler.scale).backward()
    hook.remove()
    by_hand = grads()
    rank = torch.distributed.get_rank()
    result = dict(
        rank=rank, pre=model.pre_process, fills_run=comm.fills_run,
        no_fill_identical=all(torch.equal(plain[k], no_fill[k]) for k in plain),
        fill_changed=[k for k in plain if not torch.equal(plain[k], filled[k])],
        fill_max_err=max(float((filled[k] - plain[k] - by_hand[k]).abs().max()) for k in plain),
        by_hand_nonzero=[k for k in by_hand if by_hand[k].abs().sum() > 0],
        layer2_calls_in_fill=len(calls), losses=plain_losses, filled_losses=filled_losses,
    )
    with open(f"{out_path}.{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
