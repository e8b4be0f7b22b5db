"""Pipelined (PP=2) early-exit decoding vs single-stage decoding, one rank of a 2-process torchrun.

    python -m torch.distributed.run --nproc_per_node 2 _pipelined_decode_worker.py OUT_DIR

For each model of MODELS: rank 0 trains a small early-exit model (fixed seed, TP=PP=1) and it is
saved as a distributed checkpoint; rank 0 decodes every case
with :func:`nemo_ee.inference.generate.generate` (KV recomputation) while rank 1 waits (timed);
then the layout becomes PP=2, each rank builds its stage, loads the checkpoint (resharded on load)
and decodes every case with :func:`generate_pipelined` (timed). Rank 0 writes ``OUT_DIR/result.json``:
per model and case the reference and the pipelined generations of both ranks, and the timings.

The helpers here (MODELS, cases, train_and_save) are shared with ``_tp_decode_worker.py``.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TRAIN_STEPS = 150  # enough for the exits to be confident on most tokens of the bigram language
MAX_TOKENS = 16
PROMPT_LENGTHS = (1, 6, 13)
MODELS = {
    # learned positions, LayerNorm, GELU; norm-only exits after layers 1 (stage 0) and 3 (stage 1)
    "plain": dict(exit_layer_nums=[1, 3]),
    # RoPE, GQA, SwiGLU, RMSNorm; exits with a transformer block (own KV cache) and an MLP
    "block": dict(exit_layer_nums=[1, 3], exit_block=True, exit_mlp=True, position_embedding_type="rope",
                  num_query_groups=2, normalization="RMSNorm", activation="swiglu"),
}
# Thresholds where some tokens leave at layer 1 (stage 0), some at layer 3 (stage 1), some at full depth.
PARAMS = [
    dict(threshold=0.7),
    dict(threshold=0.75),
    dict(exit_thresholds={1: 0.9, 3: 0.6}),
    dict(exit_policy="top2_margin", threshold=0.5, active_exits=(3,)),
    dict(threshold=0.7, temperature=1.0, top_k=8, seed=3),  # stage 1 ships logits; stage 0 samples
]


def rank() -> int:
    return dist.get_rank()


def prompts() -> list:
    from tests.inference.conftest import V

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def cases(extra_stop_token: int = None) -> list:
    """(GenerationParams, description) per setting; one more with a stop token when given."""
    from nemo_ee.inference.generate import GenerationParams

    settings = list(PARAMS)
    if extra_stop_token is not None:
        settings.append(dict(threshold=0.7, stop_token_ids=(extra_stop_token,)))
    return [(GenerationParams(max_tokens=MAX_TOKENS, **s), repr(s)) for s in settings]


def train_and_save(overrides: dict, ckpt: Path):
    """Rank 0 trains the PP=1 model and saves it to ``ckpt``; returns this rank's model.

    The layout is TP=PP=1, DP=2: the checkpoint takes each tensor from its DP-rank-0 replica only, so
    rank 1 just builds the same architecture (untrained) to take part in the collective save. A
    checkpoint holding rank 1's weights would make every decoding comparison fail.
    """
    import tests.inference.conftest as models
    from nemo_ee.checkpoint.dist import save_model
    from nemo_ee.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1)
    models.STEPS = TRAIN_STEPS if rank() == 0 else 0
    model = models.train_model(**overrides)
    save_model(model, ckpt)
    return model


def as_dict(gen) -> dict:
    return dict(tokens=list(gen.token_ids), depths=list(gen.exit_layers), finish=gen.finish_reason)


def reference(model, settings, texts) -> tuple:
    """Rank 0 decodes every (prompt, setting) with generate() at batch 1; broadcast to all ranks."""
    from nemo_ee.inference.generate import generate

    box = [None]
    if rank() == 0:
        start, out = time.perf_counter(), []
        for params, _ in settings:
            out.append([as_dict(generate(model, [p], params)[0]) for p in texts])
        box = [(out, time.perf_counter() - start)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stage_model(ee_config, ckpt: Path, tp: int = 1, pp: int = 1):
    """This rank's part of the model at the (tp, pp) layout, loaded from the PP=1 checkpoint."""
    from nemo_ee.checkpoint.dist import load_model
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.models import build_model
    from nemo_ee.parallel.initialize import initialize_distributed

    cfg = EarlyExitConfig.from_dict(dict(ee_config.to_dict(), tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp))
    initialize_distributed(tp, pp)
    model = build_model(cfg)
    load_model(model, ckpt)
    model.eval()
    return model


def refusals(stage, ee_config, prompt) -> dict:
    """The errors generate_pipelined raises, identically on every rank, before any message is sent."""
    from nemo_ee.config import EarlyExitConfig
    from nemo_ee.inference.generate import GenerationParams
    from nemo_ee.inference.pipelined import generate_pipelined
    from nemo_ee.models import build_model

    whole = build_model(EarlyExitConfig.from_dict(dict(ee_config.to_dict(), pipeline_model_parallel_size=2)),
                        pre_process=True, post_process=True)
    attempts = {
        "speculative": (stage, prompt, GenerationParams(decode_mode="self_speculative")),
        "empty": (stage, [], GenerationParams()),
        "layout": (whole, prompt, GenerationParams()),
    }
    errors = {}
    for name, args in attempts.items():
        try:
            generate_pipelined(*args)
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    return errors


def main(out_dir: Path) -> None:
    from nemo_ee.inference.pipelined import generate_pipelined

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    texts, result = prompts(), {}
    for name, overrides in MODELS.items():
        ckpt, t0 = out_dir / f"ckpt_{name}", time.perf_counter()
        model = train_and_save(overrides, ckpt)
        train_seconds = time.perf_counter() - t0
        first, _ = reference(model, cases()[:1], texts)
        settings = cases(extra_stop_token=first[0][0]["tokens"][4])
        ref, ref_seconds = reference(model, settings, texts)
        # PP=1 (each rank its own one-stage pipeline): the stage is first and last, no message is sent
        alone = [as_dict(generate_pipelined(model, p, settings[0][0])) for p in texts] if rank() == 0 else None
        ee_config = model.ee_config
        del model
        t0 = time.perf_counter()
        stage = stage_model(ee_config, ckpt, pp=2)
        load_seconds = time.perf_counter() - t0
        dist.barrier()
        start, mine = time.perf_counter(), []
        for params, _ in settings:
            mine.append([as_dict(generate_pipelined(stage, p, params)) for p in texts])
        pp_seconds = time.perf_counter() - start
        errors = refusals(stage, ee_config, texts[0])
        both, exits = [None, None], [None, None]
        dist.all_gather_object(both, mine)
        dist.all_gather_object(exits, sorted(head.layer_num for head in stage.exits.values()))
        tokens = sum(len(g["tokens"]) for row in ref for g in row)
        result[name] = dict(cases=[d for _, d in settings], reference=ref, pipelined=both,
                            ref_seconds=ref_seconds, pp_seconds=pp_seconds, tokens=tokens,
                            stage_exits=exits, pp1_pipelined=alone, errors=errors, train_seconds=train_seconds, load_seconds=load_seconds)
    if rank() == 0:
        (out_dir / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
