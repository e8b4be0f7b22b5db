"""Tensor-parallel (TP=2) early-exit decoding vs TP=1, one rank of a 2-process torchrun.

    python -m torch.distributed.run --nproc_per_node 2 _tp_decode_worker.py OUT_DIR

For each model of ``_pipelined_decode_worker.MODELS``: rank 0 trains the model (TP=PP=1), it is
saved as a distributed checkpoint, rank 0 decodes every case at TP=1 (one prompt per call); then
the layout becomes TP=2, each rank loads its shard of the checkpoint (resharded on load) and both
ranks decode every case with ``generate`` (all prompts of a case in one batch, rows exiting on their
own; self-speculative one prompt at a time). Rank 0 writes ``OUT_DIR/result.json``.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import _pipelined_decode_worker as shared  # noqa: E402

EXTRA = [dict(decode_mode="self_speculative", num_draft=3, draft_exit=1)]  # greedy drafts at layer 1, verified


def main(out_dir: Path) -> None:
    from nemo_ee.inference.generate import GenerationParams, generate

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    texts, result = shared.prompts(), {}
    for name, overrides in shared.MODELS.items():
        ckpt = out_dir / f"ckpt_{name}"
        model = shared.train_and_save(overrides, ckpt)
        first, _ = shared.reference(model, shared.cases()[:1], texts)
        settings = shared.cases(extra_stop_token=first[0][0]["tokens"][4])
        settings += [(GenerationParams(max_tokens=shared.MAX_TOKENS, **s), repr(s)) for s in EXTRA]
        ref, ref_seconds = shared.reference(model, settings, texts)
        ee_config = model.ee_config
        del model
        sharded = shared.stage_model(ee_config, ckpt, tp=2)
        dist.barrier()
        start, mine = time.perf_counter(), []
        for params, _ in settings:
            mine.append([shared.as_dict(g) for g in generate(sharded, texts, params)])
        tp_seconds = time.perf_counter() - start
        both, heads = [None, None], [None, None]
        dist.all_gather_object(both, mine)
        attn = sharded.decoder.layers[0].self_attention
        dist.all_gather_object(heads, [attn.num_attention_heads_per_partition, attn.num_query_groups_per_partition,
                                       tuple(sharded.decoder.layers[0].mlp.linear_fc1.weight.shape)])
        tokens = sum(len(g["tokens"]) for row in ref for g in row)
        result[name] = dict(cases=[d for _, d in settings], reference=ref, tp2=both, ref_seconds=ref_seconds,
                            tp_seconds=tp_seconds, tokens=tokens, shard=heads)
    if shared.rank() == 0:
        (out_dir / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
