"""megatron-core / NeMo-2 distributed checkpoints of a plain GPT -> .nemo: the restored early-exit model (no exits)
gives megatron's own GPTModel's logits exactly, and bad checkpoints or architectures fail with clear errors."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from nemo_ee.checkpoint.megatron_dist import convert_megatron_to_nemo, main

ROOT = Path(__file__).resolve().parents[2]
V = 320  # >= 258: the default byte-level BPE can match it
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
             normalization="RMSNorm", activation="swiglu", add_bias_linear=False, position_embedding_type="rope",
             rotary_base=500000, share_embeddings_and_output_weights=False, layernorm_epsilon=1e-6, seq_length=32)
LLAMA_ARGS = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in LLAMA.items()]


def _gpt(kind: str, vocab: int = V):
    """megatron-core's own GPTModel (local layer spec), every weight perturbed away from its seeded init."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_ee.compat.mcore import gpt_layer_spec

    fusions_off = dict(bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
                       bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                       hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True)
    if kind == "gpt2":
        cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                normalization="LayerNorm", activation_func=F.gelu, add_bias_linear=True,
                                **fusions_off)
        model = GPTModel(config=cfg, transformer_layer_spec=gpt_layer_spec(False, "LayerNorm"), vocab_size=vocab,
                         max_sequence_length=48, position_embedding_type="learned_absolute",
                         share_embeddings_and_output_weights=True)
    else:
        cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                ffn_hidden_size=96, normalization="RMSNorm", layernorm_epsilon=1e-6,
                                gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, **fusions_off)
        model = GPTModel(config=cfg, transformer_layer_spec=gpt_layer_spec(False, "RMSNorm"), vocab_size=vocab,
                         max_sequence_length=32, position_embedding_type="rope", rotary_base=500000,
                         share_embeddings_and_output_weights=False)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _save(model, path: Path, prefix: str = "", dtype=None) -> Path:
    """dist_checkpointing.save of the GPTModel, plus an optimizer tensor, and common.pt made unreadable."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from nemo_ee.checkpoint.dist import sync_save_strategy

    if dtype is not None:
        model = model.to(dtype)
    sharded = model.sharded_state_dict(prefix=prefix)
    key = f"optimizer.state.exp_avg.{prefix}decoder.final_layernorm.weight"
    sharded[key] = ShardedTensor.from_rank_offsets(key, torch.zeros(64), replica_id=0)
    path.mkdir(parents=True)
    dist_checkpointing.save(sharded, str(path), sharded_strategy=sync_save_strategy())
    (path / "common.pt").write_bytes(b"not a pickle: the importer must never open this file")
    return path


def _tokenizer_dir(path: Path, size: int = V - 8) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def add(a, b):\n    return a + b\n", "early exits read hidden states"] * 8, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def TOKENS(vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def _nemo_logits(nemo: Path, vocab: int = V) -> torch.Tensor:
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    model = EarlyExitGPTNeMoModel.restore_from(str(nemo)).eval()
    assert model.ee_config.num_exits == 0 and model.ee_config.vocab_size == vocab
    with torch.no_grad():
        got, exits = model(TOKENS(vocab))
    assert exits == {} and got.shape == (2, 24, vocab)
    return got


def _max_diff(gpt, nemo: Path, vocab: int = V) -> float:
    tokens = TOKENS(vocab)
    with torch.no_grad():
        expected = gpt.float()(tokens, torch.arange(24).expand_as(tokens), None)
    return (_nemo_logits(nemo, vocab) - expected).abs().max().item()


def test_gpt2_like_from_recipe_yaml(single_process, tmp_path):
    """LayerNorm, GELU, biases, learned positions, tied output; arch from a recipe whose exit fields are ignored;
    vocabulary and position count read from the checkpoint."""
    gpt = _gpt("gpt2")
    ckpt = _save(gpt, tmp_path / "ckpt")
    recipe = {"model": {"arch": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 128,
                                 "normalization": "LayerNorm", "activation": "gelu", "exit_layer_nums": [1, 2],
                                 "exit_loss_weights": [0.5, 0.5], "pipeline_model_parallel_size": 2}}}
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(recipe))
    nemo = convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", arch_yaml=tmp_path / "arch.yaml",
                                    tokenizer=_tokenizer_dir(tmp_path / "tok"))
    assert _max_diff(gpt, nemo) == 0.0


def test_llama_like_bf16_from_overrides_via_script_main(single_process, tmp_path, capsys):
    """RMSNorm, SwiGLU, RoPE (base 500000), GQA, untied output; saved in bf16, upcast exactly."""
    gpt = _gpt("llama")
    ckpt = _save(gpt, tmp_path / "ckpt", dtype=torch.bfloat16)
    out = main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.nemo"), "--tokenizer",
                str(_tokenizer_dir(tmp_path / "tok")), *LLAMA_ARGS])
    assert f"wrote {out}" in capsys.readouterr().out
    assert _max_diff(gpt, out) == 0.0  # gpt was cast to bf16 and back: the same values the checkpoint holds


def _nemo2(tmp_path: Path, gpt, **config_changes) -> Path:
    root = tmp_path / "nemo2"
    _save(gpt, root / "weights", prefix="module.")
    config = {
        "_target_": "nemo.collections.llm.gpt.model.llama.Llama31Config", "num_layers": 2, "hidden_size": 64,
        "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": None,
        "normalization": "RMSNorm", "layernorm_epsilon": 1e-6, "gated_linear_unit": True,
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False}, "add_bias_linear": False,
        "add_qkv_bias": False, "position_embedding_type": "rope", "rotary_base": 500000, "rotary_percent": 1.0,
        "seq_length": 32, "share_embeddings_and_output_weights": False, "make_vocab_size_divisible_by": 64,
        "vocab_size": None, "qk_layernorm": False, "num_moe_experts": None, "hidden_dropout": 0.0,
        "bf16": True, "params_dtype": {"_target_": "torch.bfloat16", "_call_": False},
    }
    config.update(config_changes)
    model = {"_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel", "config": config,
             "tokenizer": {"_target_": "nemo.collections.common.tokenizers.AutoTokenizer",
                           "pretrained_model_name": "nemo_tokenizer"}}
    (root / "context").mkdir()
    (root / "context" / "model.yaml").write_text(yaml.safe_dump(model))
    _tokenizer_dir(root / "context" / "nemo_tokenizer")
    return root


def test_nemo2_layout(single_process, tmp_path):
    """weights/ with module.-prefixed keys, architecture from context/model.yaml (no target is instantiated),
    tokenizer from context/nemo_tokenizer."""
    from nemo_ee.checkpoint.megatron_dist import locate

    gpt = _gpt("llama")
    root = _nemo2(tmp_path, gpt)
    found = locate(root / "weights")  # the weights/ folder itself is understood as its NeMo-2 checkpoint
    assert (found.root, found.weights, found.model_yaml) == (root, root / "weights", root / "context" / "model.yaml")
    assert found.tokenizer == root / "context" / "nemo_tokenizer" / "tokenizer.json"
    nemo = convert_megatron_to_nemo(root, tmp_path / "m.nemo")
    assert _max_diff(gpt, nemo) == 0.0
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    ee = EarlyExitGPTNeMoModel.restore_from(str(nemo)).ee_config
    assert (ee.rotary_base, ee.num_query_groups, ee.activation, ee.seq_length) == (500000, 2, "swiglu", 32)


def test_nemo2_unsupported_fields(single_process, tmp_path):
    gpt = _gpt("llama")
    root = _nemo2(tmp_path, gpt, qk_layernorm=True)
    with pytest.raises(ValueError, match=r"config: qk_layernorm=True is not supported by the importer"):
        convert_megatron_to_nemo(root, tmp_path / "m.nemo")
    model = yaml.safe_load((root / "context" / "model.yaml").read_text())
    model["config"].update(qk_layernorm=False, activation_func={"_target_": "torch.nn.functional.relu"})
    (root / "context" / "model.yaml").write_text(yaml.safe_dump(model))
    with pytest.raises(ValueError, match=re.escape("activation_func 'torch.nn.functional.relu' with "
                                                   "gated_linear_unit=True is not supported")):
        convert_megatron_to_nemo(root, tmp_path / "m.nemo")


def test_default_tokenizer_is_trained_with_the_checkpoint_vocab(single_process, tmp_path):
    from nemo_ee.data import CorpusSpec
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    gpt = _gpt("llama")
    ckpt = _save(gpt, tmp_path / "ckpt")
    nemo = convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=LLAMA_ARGS,
                                    corpus=CorpusSpec(max_files=5), cache_dir=tmp_path / "cache")
    assert _max_diff(gpt, nemo) == 0.0
    model = EarlyExitGPTNeMoModel.restore_from(str(nemo))
    assert 258 <= model.tokenizer.vocab_size <= V and model.tokenizer.eos_id == 0
    assert list((tmp_path / "cache").glob(f"tokenizer-*-{V}.json"))


def test_vocab_too_small_for_default_tokenizer_and_wrong_tokenizer(single_process, tmp_path):
    ckpt = _save(_gpt("llama", vocab=128), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=re.escape("the checkpoint's vocabulary has 128 rows; nemo_ee's default "
                                                   "byte-level BPE needs 258..1000000: pass the model's tokenizer "
                                                   "with --tokenizer DIR")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=LLAMA_ARGS)
    from tokenizers import Tokenizer

    tok = _tokenizer_dir(tmp_path / "tok")
    n = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    assert n > 128
    with pytest.raises(ValueError, match=re.escape(f"tokenizer {tok / 'tokenizer.json'} has {n} tokens but the "
                                                   "checkpoint's vocabulary has 128 rows")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=LLAMA_ARGS, tokenizer=tok)
    assert not (tmp_path / "m.nemo").exists()


def test_missing_or_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint directory {tmp_path / 'nope'} does not exist")):
        convert_megatron_to_nemo(tmp_path / "nope", tmp_path / "m.nemo")
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{tmp_path} is not a distributed checkpoint: no metadata.json (nor weights/metadata.json of a NeMo-2 "
            "checkpoint)")):
        convert_megatron_to_nemo(tmp_path, tmp_path / "m.nemo")
    (tmp_path / "iter_0000010").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"a Megatron-LM save folder: pass one of its iteration folders, e.g. {tmp_path / 'iter_0000010'}")):
        convert_megatron_to_nemo(tmp_path, tmp_path / "m.nemo")
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    with pytest.raises(ValueError, match=r"sharded backend 'zarr' is not supported \(only 'torch_dist'"):
        convert_megatron_to_nemo(tmp_path, tmp_path / "m.nemo")


def test_architecture_errors(single_process, tmp_path):
    ckpt = _save(_gpt("llama"), tmp_path / "ckpt")
    tok = _tokenizer_dir(tmp_path / "tok")
    with pytest.raises(ValueError, match=re.escape(
            "the architecture has no num_layers (no --arch YAML, no overrides, no context/model.yaml): pass it as "
            "an override (num_layers=N) or in an arch YAML (--arch FILE). Megatron-LM's common.pt (pickled "
            "training args) is not read")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", tokenizer=tok)
    with pytest.raises(ValueError, match=re.escape("override 'num_layers' is not KEY=VALUE")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=["num_layers"], tokenizer=tok)
    with pytest.raises(ValueError, match=re.escape("overrides: unknown EarlyExitConfig key(s) ['num_layer']")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=["num_layer=2"], tokenizer=tok)
    with pytest.raises(ValueError, match=re.escape("num_query_groups=3 must divide num_attention_heads=4")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=[*LLAMA_ARGS, "num_query_groups=3"],
                                 tokenizer=tok)
    # shapes: the checkpoint has 2 query groups, the arch says multi-head attention (4 groups)
    with pytest.raises(ValueError, match=re.escape(
            "checkpoint tensor decoder.layers.self_attention.linear_qkv.weight has shape [2, 128, 64], the "
            "architecture expects [2, 192, 64]")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=[*LLAMA_ARGS, "num_query_groups=null"],
                                 tokenizer=tok)
    with pytest.raises(ValueError, match=re.escape(
            "checkpoint tensor decoder.layers.mlp.linear_fc1.weight has shape [2, 192, 64], the architecture "
            "expects [2, 96, 64]")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", overrides=[*LLAMA_ARGS, "activation=gelu"],
                                 tokenizer=tok)
    # keys: tied output vs the checkpoint's own output layer; learned positions vs rope
    with pytest.raises(ValueError, match=re.escape(
            "does not match the architecture: the checkpoint has 1 tensor(s) the model does not: output_layer.weight "
            "(check share_embeddings_and_output_weights")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", tokenizer=tok,
                                 overrides=[*LLAMA_ARGS, "share_embeddings_and_output_weights=true"])
    with pytest.raises(ValueError, match=re.escape(
            "the model expects 1 tensor(s) the checkpoint lacks: embedding.position_embeddings.weight")):
        convert_megatron_to_nemo(ckpt, tmp_path / "m.nemo", tokenizer=tok,
                                 overrides=[*LLAMA_ARGS, "position_embedding_type=learned_absolute"])
    assert not (tmp_path / "m.nemo").exists()


def test_script_help_and_error_exit():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_megatron_to_nemo.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    for text in ("--ckpt", "--out", "--arch", "--tokenizer", "KEY=VALUE", "context/model.yaml", "common.pt",
                 "examples:"):
        assert text in res.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_megatron_to_nemo.py"), "--ckpt",
                          "/nonexistent/ckpt", "--out", "x.nemo"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "checkpoint directory /nonexistent/ckpt does not exist" in bad.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_saved_at_tp2_by_two_ranks(single_process, tmp_path):
    """A checkpoint megatron wrote from 2 tensor-parallel ranks imports at TP=1 with the TP=2 model's logits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(ROOT / "tests" / "checkpoint" / "_megatron_tp_worker.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert len(list((tmp_path / "ckpt").glob("*.distcp"))) == 2  # one shard file per rank
    expected = torch.load(tmp_path / "logits.pt", weights_only=True)
    nemo = convert_megatron_to_nemo(tmp_path / "ckpt", tmp_path / "m.nemo", overrides=LLAMA_ARGS,
                                    tokenizer=_tokenizer_dir(tmp_path / "tok"))
    diff = (_nemo_logits(nemo) - expected).abs().max().item()
    assert diff <= 1e-5  # TP=2 splits the matmuls and all-reduces partial sums: rounding only
