"""EarlyExitConfig: validation messages, per-exit values, exit placement, TransformerConfig mapping,
parameter counts (against built models and against the published shapes of the GPU recipes)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from nemo_ee.config import EarlyExitConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

# A small valid config: 8 layers, so exits may sit on layers 1..8.
BASE = dict(num_layers=8, hidden_size=64, num_attention_heads=8, vocab_size=128, seq_length=16)


def make(**overrides) -> EarlyExitConfig:
    return EarlyExitConfig(**{**BASE, **overrides})


def test_base_config_is_valid():
    cfg = make(exit_layer_nums=[2, 4])
    assert cfg.num_exits == 2
    assert cfg.ffn_size == 4 * 64


# ---------------------------------------------------------------------------------------------
# validation: every error names the bad value and what is allowed
# ---------------------------------------------------------------------------------------------
INVALID = {
    "exit layer 0": (dict(exit_layer_nums=[0, 4]), "exit layer 0 is outside 1..8"),
    "exit layer L+1": (dict(exit_layer_nums=[2, 9]), "exit layer 9 is outside 1..8"),
    "exit layer L+1 pre": (dict(exit_layer_nums=[9], exit_position="pre"), "exit layer 9 is outside 1..8"),
    "duplicate exits": (dict(exit_layer_nums=[2, 2, 4]), "exit_layer_nums=[2, 2, 4] repeats layer(s) [2]"),
    "non-increasing exits": (dict(exit_layer_nums=[4, 2]), "exit_layer_nums=[4, 2] must be in increasing order"),
    "per-exit list too long": (
        dict(exit_layer_nums=[2, 4], exit_loss_weights=[0.1, 0.2, 0.3]),
        "exit_loss_weights has 3 entries but there are 2 exits [2, 4]",
    ),
    "per-exit list too short": (
        dict(exit_layer_nums=[2, 4], exit_logit_temperature=[2.0]),
        "exit_logit_temperature has 1 entries but there are 2 exits [2, 4]",
    ),
    "negative weight": (
        dict(exit_layer_nums=[2, 4], exit_loss_weights=[0.5, -0.1]),
        "exit_loss_weights=-0.1 must be a number >= 0",
    ),
    "negative init weight": (
        dict(exit_layer_nums=[2], exit_loss_init_weights=-1.0),
        "exit_loss_init_weights=-1.0 must be a number >= 0",
    ),
    "negative warmup iters": (
        dict(exit_layer_nums=[2], exit_loss_warmup_iters=-5),
        "exit_loss_warmup_iters=-5 must be an integer >= 0",
    ),
    "bad warmup style": (
        dict(exit_layer_nums=[2, 4], exit_loss_warmup_style=["linear", "exp"]),
        "exit_loss_warmup_style='exp' is not one of ['linear', 'cosine']",
    ),
    "temperature 0": (
        dict(exit_layer_nums=[2], exit_logit_temperature=0),
        "exit_logit_temperature=0 must be a number > 0",
    ),
    "tied exits, untied embeddings": (
        dict(exit_layer_nums=[2], tie_exit_output=True, share_embeddings_and_output_weights=False),
        "tie_exit_output=True needs share_embeddings_and_output_weights=True",
    ),
    "heads not divisible by TP": (
        dict(num_attention_heads=8, tensor_model_parallel_size=3),
        "num_attention_heads=8 is not divisible by tensor_model_parallel_size=3",
    ),
    "layers not divisible by PP": (
        dict(pipeline_model_parallel_size=3),
        "num_layers=8 is not divisible by pipeline_model_parallel_size=3",
    ),
    "query groups not divisible by TP": (
        dict(num_query_groups=2, tensor_model_parallel_size=4),
        "num_query_groups=2 is not divisible by tensor_model_parallel_size=4",
    ),
    "query groups do not divide heads": (
        dict(num_query_groups=3),
        "num_query_groups=3 must divide num_attention_heads=8",
    ),
    "hidden not divisible by heads": (
        dict(hidden_size=60),
        "hidden_size=60 is not divisible by num_attention_heads=8 (set kv_channels to give the head width",
    ),
    "kv_channels 0": (dict(kv_channels=0), "kv_channels=0 must be an integer >= 1 or None"),
    "kv_channels negative": (dict(kv_channels=-8), "kv_channels=-8 must be an integer >= 1 or None"),
    "kv_channels float": (dict(kv_channels=16.0), "kv_channels=16.0 must be an integer >= 1 or None"),
    "kv_channels bool": (dict(kv_channels=True), "kv_channels=True must be an integer >= 1 or None"),
    "kv_channels string": (dict(kv_channels="16"), "kv_channels='16' must be an integer >= 1 or None"),
    "qk_layernorm string": (dict(qk_layernorm="yes"), "qk_layernorm='yes' must be true or false"),
    "qk_layernorm int": (dict(qk_layernorm=1), "qk_layernorm=1 must be true or false"),
    "sequence parallel with TP=1": (
        dict(sequence_parallel=True),
        "sequence_parallel=True needs tensor_model_parallel_size > 1, got 1",
    ),
    "bad normalization": (
        dict(normalization="BatchNorm"),
        "normalization='BatchNorm' is not one of ['LayerNorm', 'RMSNorm']",
    ),
    "bad activation": (dict(activation="relu"), "activation='relu' is not one of ['gelu', 'swiglu']"),
    "bad exit position": (
        dict(exit_layer_nums=[2], exit_position="mid"),
        "exit_position='mid' is not one of ['post', 'pre']",
    ),
    "zero layers": (dict(num_layers=0), "num_layers=0 must be an integer >= 1"),
    "dropout 1": (dict(hidden_dropout=1.0), "hidden_dropout=1.0 is outside [0, 1)"),
    "max positions below seq length": (
        dict(max_position_embeddings=8),
        "max_position_embeddings=8 is smaller than seq_length=16",
    ),
}


@pytest.mark.parametrize("overrides,message", list(INVALID.values()), ids=list(INVALID))
def test_invalid_config_raises_naming_value(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(**overrides)


def test_kv_channels_decouples_head_width_from_hidden_size():
    cfg = make(hidden_size=60, kv_channels=16)  # 60 % 8 != 0 is fine once the head width is explicit
    assert cfg.head_dim == 16 and make().head_dim == 8
    tc = cfg.transformer_config()
    assert (tc.kv_channels, tc.qk_layernorm) == (16, False)
    default = make(qk_layernorm=True).transformer_config()
    assert (default.kv_channels, default.qk_layernorm) == (8, True)  # None: megatron's hidden / heads
    assert EarlyExitConfig.from_dict({**BASE, "kv_channels": None, "qk_layernorm": True}).qk_layernorm is True


def test_nemo2_kv_channels_is_imported(tmp_path):
    """A NeMo-2 model.yaml's kv_channels other than hidden / heads is kept (None or the default is left out)."""
    import yaml

    from nemo_ee.checkpoint.megatron_arch import arch_from_nemo2

    def arch(**changes):
        config = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "gated_linear_unit": True,
                  "activation_func": "torch.nn.functional.silu", **changes}
        (tmp_path / "model.yaml").write_text(yaml.safe_dump({"config": config}))
        return arch_from_nemo2(tmp_path / "model.yaml")

    assert arch(kv_channels=24)["kv_channels"] == 24
    assert "kv_channels" not in arch(kv_channels=16) and "kv_channels" not in arch(kv_channels=None)
    assert EarlyExitConfig(**{**arch(kv_channels=24), "vocab_size": 64, "seq_length": 16}).head_dim == 24


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ValueError, match=re.escape("unknown EarlyExitConfig key(s) ['num_layer', 'zzz']; allowed: [")):
        EarlyExitConfig.from_dict({**BASE, "num_layer": 4, "zzz": 1})


def test_from_dict_accepts_tuples_and_validates():
    cfg = EarlyExitConfig.from_dict({**BASE, "exit_layer_nums": (2, 4), "exit_loss_weights": (0.1, 0.2)})
    assert cfg.exit_layer_nums == [2, 4] and cfg.exit_loss_weights == [0.1, 0.2]
    with pytest.raises(ValueError, match=re.escape("exit layer 9 is outside 1..8")):
        EarlyExitConfig.from_dict({**BASE, "exit_layer_nums": [9]})


def test_tied_exits_on_any_stage_join_the_embedding_group():
    cfg = make(exit_layer_nums=[1, 2, 7, 8], tie_exit_output=True, pipeline_model_parallel_size=4)
    assert [cfg.exit_stage(n) for n in cfg.exit_layer_nums] == [0, 0, 3, 3]
    assert cfg.embedding_stages == [0, 3]
    # pre exits move one point down: pre 7 reads after layer 6, on middle stage 2
    cfg = make(exit_layer_nums=[1, 7], tie_exit_output=True, pipeline_model_parallel_size=4, exit_position="pre")
    assert cfg.embedding_stages == [0, 2, 3]
    untied = make(exit_layer_nums=[1, 7], pipeline_model_parallel_size=4, exit_position="pre")
    assert untied.embedding_stages == [0, 3]


# ---------------------------------------------------------------------------------------------
# per-exit values
# ---------------------------------------------------------------------------------------------
def test_per_exit_broadcasts_scalars():
    cfg = make(exit_layer_nums=[2, 4, 6], exit_loss_weights=0.3, exit_loss_warmup_style="cosine",
               exit_loss_warmup_iters=10, exit_dynamic_token_weight=True)
    assert cfg.per_exit("exit_loss_weights") == [0.3, 0.3, 0.3]
    assert cfg.per_exit("exit_loss_warmup_style") == ["cosine"] * 3  # a string is a scalar
    assert cfg.per_exit("exit_loss_warmup_iters") == [10, 10, 10]
    assert cfg.per_exit("exit_loss_init_weights") == [None, None, None]
    assert cfg.per_exit("exit_logit_temperature") == [1.0, 1.0, 1.0]
    assert cfg.per_exit("exit_dynamic_token_weight") == [True, True, True]


def test_per_exit_keeps_lists():
    cfg = make(exit_layer_nums=[2, 4], exit_loss_weights=(0.25, 0.5), exit_loss_warmup_style=["linear", "cosine"],
               exit_loss_init_weights=[0.0, None])
    assert cfg.per_exit("exit_loss_weights") == [0.25, 0.5]
    assert cfg.per_exit("exit_loss_warmup_style") == ["linear", "cosine"]
    assert cfg.per_exit("exit_loss_init_weights") == [0.0, None]


def test_per_exit_without_exits():
    cfg = make()
    assert cfg.num_exits == 0
    assert cfg.per_exit("exit_loss_weights") == []


# ---------------------------------------------------------------------------------------------
# exit placement
# ---------------------------------------------------------------------------------------------
def test_exit_point_post_and_pre():
    post, pre = make(), make(exit_position="pre")
    assert [post.exit_point(n) for n in (1, 4, 8)] == [1, 4, 8]
    assert [pre.exit_point(n) for n in (1, 4, 8)] == [0, 3, 7]
    assert pre.exit_point(9) == post.exit_point(8) == 8  # pre at L+1 == post at L
    assert pre.exit_point(1) == 0 and pre.exit_stage(1) == 0  # pre at 1 reads the embedding output


def test_exit_stage_with_two_pipeline_stages():
    post = make(pipeline_model_parallel_size=2)
    assert [post.exit_stage(n) for n in range(1, 9)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert post.exit_stage(4) == 0 and post.exit_stage(5) == 1
    pre = make(pipeline_model_parallel_size=2, exit_position="pre")
    assert [pre.exit_stage(n) for n in range(1, 9)] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert pre.exit_stage(5) == post.exit_stage(4) == 0  # pre 5 reads the output of layer 4
    assert pre.exit_stage(9) == post.exit_stage(8) == 1


def test_exit_stage_single_stage_is_zero():
    cfg = make()
    assert {cfg.exit_stage(n) for n in range(1, 9)} == {0}


# ---------------------------------------------------------------------------------------------
# TransformerConfig mapping
# ---------------------------------------------------------------------------------------------
def test_transformer_config_gelu_layernorm():
    tc = make(ffn_hidden_size=96, layernorm_epsilon=1e-6, init_method_std=0.01).transformer_config()
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (8, 64, 8, 8)
    assert tc.ffn_hidden_size == 96
    assert tc.gated_linear_unit is False and tc.activation_func is F.gelu
    assert tc.normalization == "LayerNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.add_bias_linear is True and tc.add_qkv_bias is False
    assert tc.init_method_std == 0.01
    assert tc.params_dtype == torch.float32 and not tc.bf16 and not tc.fp16
    assert tc.tensor_model_parallel_size == 1 and tc.pipeline_model_parallel_size == 1
    assert tc.sequence_parallel is False


def test_transformer_config_swiglu_rmsnorm_parallel_bf16():
    cfg = make(activation="swiglu", normalization="RMSNorm", add_bias_linear=False, num_query_groups=4,
               tensor_model_parallel_size=2, pipeline_model_parallel_size=4, sequence_parallel=True,
               params_dtype="bfloat16")
    tc = cfg.transformer_config()
    assert tc.gated_linear_unit is True and tc.activation_func is F.silu
    assert tc.ffn_hidden_size == 4 * 64  # default ffn size
    assert tc.normalization == "RMSNorm"
    assert tc.add_bias_linear is False
    assert tc.num_query_groups == 4
    assert tc.tensor_model_parallel_size == 2 and tc.pipeline_model_parallel_size == 4
    assert tc.sequence_parallel is True
    assert tc.params_dtype == torch.bfloat16 and tc.pipeline_dtype == torch.bfloat16
    assert tc.bf16 is True and tc.fp16 is False


def test_transformer_config_fp16_and_overrides():
    tc = make(params_dtype="float16").transformer_config(hidden_dropout=0.25)
    assert tc.params_dtype == torch.float16 and tc.fp16 is True and tc.bf16 is False
    assert tc.hidden_dropout == 0.25


# ---------------------------------------------------------------------------------------------
# parameter_count against built models (CPU, world of one)
# ---------------------------------------------------------------------------------------------
TINY = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=128, seq_length=16)
GPT2_STYLE = dict(normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
                  share_embeddings_and_output_weights=True, add_bias_linear=True)
LLAMA_STYLE = dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope",
                   share_embeddings_and_output_weights=False, add_bias_linear=False)
HEADS = {
    "norm": dict(exit_norm=True),
    "mlp": dict(exit_norm=True, exit_mlp=True),
    "block": dict(exit_norm=True, exit_block=True),
    "mlp+block": dict(exit_norm=True, exit_mlp=True, exit_block=True),
    "bare": dict(exit_norm=False),
    "mlp-no-norm": dict(exit_norm=False, exit_mlp=True),
}
CASES = {
    "gpt2-no-exits": dict(**GPT2_STYLE),
    "llama-no-exits": dict(**LLAMA_STYLE),
    "gqa": dict(**GPT2_STYLE, num_query_groups=2, exit_layer_nums=[2]),
    "gqa-qkv-bias-only": dict(**LLAMA_STYLE, num_query_groups=2, add_qkv_bias=True, exit_layer_nums=[2]),
    "swiglu-ffn-48": dict(**GPT2_STYLE, activation_override="swiglu", ffn_hidden_size=48, exit_layer_nums=[1, 3]),
    "max-positions-32": dict(**GPT2_STYLE, max_position_embeddings=32, exit_layer_nums=[2]),
    "tied-exit": dict(**GPT2_STYLE, exit_layer_nums=[1, 3], tie_exit_output=True),
    "tied-exit-mlp-block": dict(**GPT2_STYLE, exit_layer_nums=[2], tie_exit_output=True, exit_mlp=True, exit_block=True),
    "pre-exits": dict(**GPT2_STYLE, exit_layer_nums=[1, 4], exit_position="pre", exit_mlp=True),
    "pre-exits-llama": dict(**LLAMA_STYLE, exit_layer_nums=[1, 3], exit_position="pre", exit_block=True),
    # head width != hidden / heads (megatron kv_channels), per-head q/k norms (qk_layernorm), in exit blocks too
    "kv-channels-wide-gqa": dict(**LLAMA_STYLE, kv_channels=12, num_query_groups=2, exit_layer_nums=[2],
                                 exit_block=True),
    "kv-channels-hidden-30": dict(**LLAMA_STYLE, hidden_size=30, kv_channels=8, exit_layer_nums=[1], exit_mlp=True),
    "kv-channels-bias": dict(**GPT2_STYLE, kv_channels=4, exit_layer_nums=[1]),
    "qk-layernorm-rmsnorm": dict(**LLAMA_STYLE, qk_layernorm=True, kv_channels=12, exit_layer_nums=[1, 3],
                                 exit_block=True),
    "qk-layernorm-layernorm": dict(**GPT2_STYLE, qk_layernorm=True, exit_layer_nums=[2], exit_block=True,
                                   tie_exit_output=True),
}
for _style, _backbone in (("gpt2", GPT2_STYLE), ("llama", LLAMA_STYLE)):
    for _head, _flags in HEADS.items():
        CASES[f"{_style}-{_head}"] = dict(**_backbone, **_flags, exit_layer_nums=[1, 3])


def _tiny(case: dict) -> EarlyExitConfig:
    case = dict(case)
    if "activation_override" in case:
        case["activation"] = case.pop("activation_override")
    return EarlyExitConfig(**{**TINY, **case})


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_parameter_count_matches_built_model(single_process, case):
    from nemo_ee.models.early_exit_gpt import build_model

    cfg = _tiny(case)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.parameter_count()
    assert len(model.exits) == cfg.num_exits


def test_parameter_count_ignores_parallel_layout():
    serial = make(num_query_groups=4, exit_layer_nums=[2, 6], exit_mlp=True).parameter_count()
    split = make(num_query_groups=4, exit_layer_nums=[2, 6], exit_mlp=True,
                 tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True)
    assert split.parameter_count() == serial


# ---------------------------------------------------------------------------------------------
# the GPU recipes: structure and published sizes (no weights built)
# ---------------------------------------------------------------------------------------------
def _recipe(name: str):
    return OmegaConf.load(CONF / f"{name}.yaml")


def _arch(name: str) -> EarlyExitConfig:
    return EarlyExitConfig.from_dict(OmegaConf.to_container(_recipe(name).model.arch, resolve=True))


def _backbone(cfg: EarlyExitConfig) -> EarlyExitConfig:
    return dataclasses.replace(cfg, exit_layer_nums=[], exit_loss_weights=1.0)


def test_1b3_parameter_count_closed_form():
    cfg = _arch("ee_gpt_1b3")
    V, L, h, f = 32000, 24, 2048, 5440
    assert (cfg.vocab_size, cfg.num_layers, cfg.hidden_size, cfg.ffn_size) == (V, L, h, f)
    assert f == int(4 * h * 2 / 3 / 64) * 64  # Megatron-LM's SwiGLU default, which EE-LLM's script used
    assert cfg.num_attention_heads == 32
    # one SwiGLU layer without biases and two RMSNorms (weight only):
    layer = h * 3 * h + h * h + h * 2 * f + f * h + 2 * h
    assert layer == 4 * h * h + 3 * h * f + 2 * h
    # word embedding tied with the output layer, RoPE (no position table), layers, final RMSNorm
    backbone = V * h + L * layer + h
    # exits: no norm, output tied to the word embedding -> no parameters of their own
    assert backbone == 1_270_450_176
    assert _backbone(cfg).parameter_count() == backbone
    assert cfg.parameter_count() == backbone
    assert 1.2e9 < backbone < 1.45e9


def test_7b_parameter_count_closed_form():
    cfg = _arch("ee_gpt_7b")
    V, L, h, f = 32000, 32, 4096, 10880
    assert (cfg.vocab_size, cfg.num_layers, cfg.hidden_size, cfg.ffn_size) == (V, L, h, f)
    assert cfg.num_attention_heads == 32 and cfg.num_query_groups is None
    # one SwiGLU layer without biases and two RMSNorms (weight only):
    qkv = h * 3 * h
    proj = h * h
    fc1 = h * 2 * f  # gate and up projections
    fc2 = f * h
    norms = 2 * h
    layer = qkv + proj + fc1 + fc2 + norms
    assert layer == 4 * h * h + 3 * h * f + 2 * h
    # word embedding + untied output layer (no position table with RoPE) + layers + final RMSNorm
    backbone = V * h + V * h + L * layer + h
    # each exit: its own output projection (no exit norm, as EE-LLM)
    exits = 2 * (V * h)
    assert backbone == 6_688_083_968
    assert backbone + exits == 6_950_227_968
    assert _backbone(cfg).parameter_count() == backbone
    assert cfg.parameter_count() == backbone + exits
    assert 6.5e9 < backbone < 7.5e9


def test_1b3_recipe_arch():
    cfg = _arch("ee_gpt_1b3")
    assert (cfg.normalization, cfg.activation, cfg.position_embedding_type) == ("RMSNorm", "swiglu", "rope")
    assert not cfg.add_bias_linear and cfg.share_embeddings_and_output_weights
    assert cfg.seq_length == 2048 and cfg.params_dtype == "bfloat16"
    assert cfg.exit_layer_nums == [6, 12] and [cfg.exit_point(n) for n in cfg.exit_layer_nums] == [6, 12]
    assert cfg.per_exit("exit_loss_weights") == [0.25, 0.5]
    assert cfg.tie_exit_output is True and cfg.exit_norm is False
    assert [cfg.exit_stage(n) for n in cfg.exit_layer_nums] == [0, 0]


def test_7b_recipe_arch():
    cfg = _arch("ee_gpt_7b")
    assert (cfg.normalization, cfg.activation, cfg.position_embedding_type) == ("RMSNorm", "swiglu", "rope")
    assert not cfg.add_bias_linear and not cfg.share_embeddings_and_output_weights
    assert cfg.seq_length == 2048 and cfg.params_dtype == "bfloat16"
    assert cfg.exit_layer_nums == [8, 16] and [cfg.exit_point(n) for n in cfg.exit_layer_nums] == [8, 16]
    assert cfg.per_exit("exit_loss_weights") == [0.1, 0.2]
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (4, 2)
    assert [cfg.exit_stage(n) for n in cfg.exit_layer_nums] == [0, 0]
    tc = cfg.transformer_config()
    assert tc.gated_linear_unit and tc.ffn_hidden_size == 10880 and tc.sequence_parallel
    assert tc.params_dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["ee_gpt_1b3", "ee_gpt_7b"])
def test_gpu_recipe_layout(name):
    from nemo_ee.parallel.optimizer import OptimSettings

    recipe = _recipe(name)
    assert recipe.name == name
    assert recipe.trainer.accelerator == "gpu" and recipe.trainer.devices == 8
    for section in ("tokenizer", "data", "arch", "optim"):
        assert section in recipe.model
    cfg = _arch(name)
    assert recipe.model.tokenizer.vocab_size == cfg.vocab_size
    world = recipe.trainer.devices * recipe.trainer.get("num_nodes", 1)
    model_parallel = cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size
    assert world % model_parallel == 0
    dp = world // model_parallel
    assert recipe.model.global_batch_size % (recipe.model.micro_batch_size * dp) == 0
    optim = OptimSettings(**OmegaConf.to_container(recipe.model.optim))
    assert (optim.lr, optim.min_lr, optim.decay_style) == (3e-4, 3e-5, "cosine")
    assert "torchrun" in (CONF / f"{name}.yaml").read_text()
