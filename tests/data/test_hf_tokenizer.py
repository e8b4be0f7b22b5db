"""An imported model's own HF tokenizer (nemo_ee.data.hf_tokenizer): the bundle, HFTokenizer against
transformers.AutoTokenizer on the original folder, chat templates, message checks and load_tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from nemo_ee.data.hf_tokenizer import (  # noqa: E402
    BUNDLE_FORMAT, BUNDLE_NAME, MAX_MESSAGES, HFTokenizer, check_messages, load_tokenizer, read_bundle, write_bundle,
)
from nemo_ee.data.tokenizer import EETokenizer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|pad|>", "<s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4, in this order
TRAIN_TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
               "import os\nprint(os.getcwd())\n", "early exits read hidden states of layers",
               "user assistant system"] * 4
TEXTS = ["def add(a, b):\n    return a + b\n", "Hello, world!", "naïve café — 日本語 🚀 ünïcödé",
         "<|im_start|>user\nhi<|im_end|>", "   leading spaces and\ttabs\n\n", ""]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi — 🚀 ünï"}]


def _train(path: Path, specials=SPECIALS) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXTS, trainer=trainer)
    tok.save(str(path))
    return tok


def _hf_folder(folder: Path, *, chat: bool = True, generation_eos=(0, 9999, 4), pad=None, config=None) -> Tokenizer:
    """A toy HF tokenizer folder: tokenizer.json, tokenizer_config.json (eos <|im_end|> = 4, bos <s> = 2),
    an optional chat_template.jinja, generation_config.json (eos ids ``generation_eos``, None: no file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": "<s>",
        "pad_token": pad}))
    if chat:
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(generation_eos),
                                                                   "max_new_tokens": 7}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return tok


def _hf_tokenizer(tmp_path: Path, **kw) -> tuple[HFTokenizer, Path, Tokenizer]:
    folder = tmp_path / "hf"
    raw = _hf_folder(folder, **kw)
    bundle = write_bundle(folder, tmp_path / BUNDLE_NAME)
    return HFTokenizer(folder / "tokenizer.json", bundle), folder, raw


@pytest.fixture
def toy(tmp_path):
    return _hf_tokenizer(tmp_path)


def test_round_trip_matches_auto_tokenizer(toy):
    tok, folder, raw = toy
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert [raw.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(ref(text)["input_ids"]) == raw.encode(text).ids, text
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 3 and tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 4
    assert tok.encode_batch(TEXTS) == [list(ref(t)["input_ids"]) for t in TEXTS]
    assert tok.decode(tok.encode("a<|im_end|>"), skip_special_tokens=True) == "a"
    assert tok.vocab_size == len(ref) == raw.get_vocab_size(with_added_tokens=True)
    assert tok.vocab_size <= 300
    # generation_config's ids first (9999 >= vocab is dropped), then the tokenizer's eos (4, already there)
    assert tok.eos_ids == (0, 4) and tok.eos_id == 0
    assert tok.bos_id == 2 and tok.pad_id is None
    assert tok.chat_template == CHAT_TEMPLATE == ref.chat_template


def test_bundle_contents(toy, tmp_path):
    bundle = json.loads((tmp_path / BUNDLE_NAME).read_text())
    assert bundle["format"] == BUNDLE_FORMAT
    assert set(bundle["files"]) == {"tokenizer_config.json", "chat_template.jinja"}  # no tokenizer.json, no config
    assert bundle["files"]["chat_template.jinja"] == CHAT_TEMPLATE
    assert bundle["generation_eos_token_ids"] == [0, 9999, 4]  # as written; HFTokenizer drops 9999
    assert read_bundle(tmp_path / BUNDLE_NAME) == bundle


@pytest.mark.parametrize("generation_eos, expected", [
    ((0,), (0, 4)),          # generation ids first, then the tokenizer's eos
    ((4, 1, 4), (4, 1)),     # de-duplicated, order kept
    ((300, 4000), (4,)),     # ids >= vocab dropped
    ((), (4,)),              # no generation ids: the tokenizer's eos alone
])
def test_eos_ids_order(tmp_path, generation_eos, expected):
    tok, _, _ = _hf_tokenizer(tmp_path, generation_eos=generation_eos)
    assert tok.eos_ids == expected and tok.eos_id == expected[0]


def test_pad_token_and_config_eos_fallback(tmp_path):
    """A pad token named in tokenizer_config.json is the pad id; without generation_config.json the stop ids
    come from config.json's eos_token_id; the bundle keeps only config.json's model_type."""
    config = {"model_type": "llama", "eos_token_id": [1, 0], "hidden_size": 64, "vocab_size": 300}
    tok, _, _ = _hf_tokenizer(tmp_path, pad="<|pad|>", generation_eos=None, config=config)
    assert tok.pad_id == 1
    assert tok.eos_ids == (1, 0, 4)
    bundle = read_bundle(tmp_path / BUNDLE_NAME)
    assert bundle["files"]["config.json"] == '{"model_type": "llama"}'
    assert bundle["generation_eos_token_ids"] == [1, 0]


def test_generation_config_without_eos_falls_back_to_config(tmp_path):
    folder = tmp_path / "hf"
    _hf_folder(folder, generation_eos=None, config={"model_type": "qwen2", "eos_token_id": 3})
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    assert read_bundle(write_bundle(folder, tmp_path / "b.json"))["generation_eos_token_ids"] == [3]


def test_config_without_model_type_is_not_bundled(tmp_path):
    folder = tmp_path / "hf"
    _hf_folder(folder, config={"hidden_size": 64})
    assert "config.json" not in read_bundle(write_bundle(folder, tmp_path / "b.json"))["files"]


def test_write_bundle_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        write_bundle(tmp_path, tmp_path / "b.json")
    folder = tmp_path / "hf"
    _hf_folder(folder, generation_eos=(1, -2))
    with pytest.raises(ValueError, match=r"eos_token_id=\[1, -2\] must be an id >= 0 or a list of them"):
        write_bundle(folder, tmp_path / "b.json")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": True}))
    with pytest.raises(ValueError, match="eos_token_id=True must be an id >= 0"):
        write_bundle(folder, tmp_path / "b.json")


def test_apply_chat_template_matches_auto_tokenizer(toy):
    tok, folder, _ = toy
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    got = tok.apply_chat_template(MESSAGES)
    assert got == expected
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi — 🚀 ünï<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(got) == text
    no_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert tok.decode(no_prompt) == text[:-len("<|im_start|>assistant\n")]
    with pytest.raises(ValueError, match=r"messages\[0\]\.role='robot' is not one of"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_no_chat_template_is_an_error(tmp_path):
    tok, _, _ = _hf_tokenizer(tmp_path, chat=False)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="^this model's tokenizer has no chat template; send a plain prompt instead$"):
        tok.apply_chat_template(MESSAGES)


def test_check_messages():
    ok = [{"role": r, "content": "x"} for r in ("system", "user", "assistant", "tool")]
    assert check_messages(ok) == ok
    assert check_messages(tuple(ok)) == ok
    assert check_messages([{"role": "user", "content": "", "name": "bob"}]) == [{"role": "user", "content": "",
                                                                                  "name": "bob"}]
    assert len(check_messages([{"role": "user", "content": "x"}] * MAX_MESSAGES)) == MAX_MESSAGES
    empty = "messages must be a non-empty list of {'role': ..., 'content': ...} objects"
    for bad in ([], (), None, "hi", {"role": "user", "content": "x"}):
        with pytest.raises(ValueError) as err:
            check_messages(bad)
        assert str(err.value) == empty
    shape = r"messages\[1\] must be an object with 'role' and 'content' \(and optionally 'name'\), got "
    with pytest.raises(ValueError, match=shape + "'hello'"):
        check_messages([{"role": "user", "content": "x"}, "hello"])
    with pytest.raises(ValueError, match=shape):
        check_messages([ok[0], {"role": "user", "content": "x", "extra": 1}])
    with pytest.raises(ValueError, match=shape):
        check_messages([ok[0], {"role": "user"}])
    with pytest.raises(ValueError, match=shape):
        check_messages([ok[0], {"content": "x"}])
    with pytest.raises(ValueError) as err:
        check_messages([{"role": "robot", "content": "x"}])
    assert str(err.value) == "messages[0].role='robot' is not one of ['system', 'user', 'assistant', 'tool']"
    with pytest.raises(ValueError) as err:
        check_messages([ok[0], ok[1], {"role": "user", "content": 3}])
    assert str(err.value) == "messages[2].content must be a string, got int"
    with pytest.raises(ValueError) as err:
        check_messages([{"role": "user", "content": None}])
    assert str(err.value) == "messages[0].content must be a string, got NoneType"
    with pytest.raises(ValueError) as err:
        check_messages([{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1))
    assert str(err.value) == "257 messages; at most 256"


def test_read_bundle_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="HF tokenizer bundle .*missing.json' does not exist"):
        read_bundle(tmp_path / "missing.json")
    path = tmp_path / "b.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="b.json is not JSON: "):
        read_bundle(path)
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="b.json is not JSON: "):
        read_bundle(path)
    for bad in ({"format": "other/1", "files": {}}, {"files": {}}, [BUNDLE_FORMAT]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"b.json is not an HF tokenizer bundle \(format 'nemo_ee.hf_tokenizer/1'\)"):
            read_bundle(path)
    for files in ({"evil.txt": "x"}, {"tokenizer.json": "{}"}, {"tokenizer_config.json": 3}, ["config.json"], None):
        path.write_text(json.dumps({"format": BUNDLE_FORMAT, "files": files}))
        with pytest.raises(ValueError, match="b.json: 'files' must map some of \\['tokenizer_config.json'"):
            read_bundle(path)
    path.write_text(json.dumps({"format": BUNDLE_FORMAT, "files": {}, "generation_eos_token_ids": ["2"]}))
    with pytest.raises(ValueError, match=r"eos_token_id=\['2'\] must be an id >= 0"):
        read_bundle(path)
    path.write_text(json.dumps({"format": BUNDLE_FORMAT, "files": {}, "generation_eos_token_ids": 5}))
    assert read_bundle(path) == {"format": BUNDLE_FORMAT, "files": {}, "generation_eos_token_ids": [5]}
    path.write_text(json.dumps({"format": BUNDLE_FORMAT, "files": {}}))
    assert read_bundle(path)["generation_eos_token_ids"] == []


def test_hf_tokenizer_missing_tokenizer_file(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file .*nope.json' does not exist"):
        HFTokenizer(tmp_path / "nope.json", tmp_path / BUNDLE_NAME)


def test_save_files_then_load_tokenizer(toy, tmp_path):
    tok, _, _ = toy
    entries = tok.save_files(tmp_path / "saved" / "deep")
    folder = tmp_path / "saved" / "deep"
    assert entries == {"tokenizer_file": str(folder / "tokenizer.json"), "hf_tokenizer_file": str(folder / BUNDLE_NAME)}
    again = load_tokenizer(entries["tokenizer_file"], entries["hf_tokenizer_file"])
    assert isinstance(again, HFTokenizer)
    assert again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 40
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert again.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)
    assert (again.eos_ids, again.pad_id, again.bos_id, again.vocab_size) == (tok.eos_ids, tok.pad_id, tok.bos_id,
                                                                              tok.vocab_size)
    # the fingerprint notices a change of the bundle (another chat template)
    bundle = json.loads((folder / BUNDLE_NAME).read_text())
    bundle["files"]["chat_template.jinja"] = CHAT_TEMPLATE + " "
    (folder / BUNDLE_NAME).write_text(json.dumps(bundle))
    assert load_tokenizer(folder / "tokenizer.json", folder / BUNDLE_NAME).fingerprint != tok.fingerprint


def test_save_pretrained_is_loadable_by_transformers(toy, tmp_path):
    tok, _, _ = toy
    tok.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["chat_template.jinja", "tokenizer.json",
                                                                       "tokenizer_config.json"]
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert [list(ref(t)["input_ids"]) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_save_pretrained_leaves_out_config(tmp_path):
    tok, _, _ = _hf_tokenizer(tmp_path, config={"model_type": "llama"})
    tok.save_pretrained(tmp_path / "export")
    assert not (tmp_path / "export" / "config.json").exists()


def test_load_tokenizer_without_bundle_is_an_ee_tokenizer(tmp_path):
    path = tmp_path / "ee.json"
    _train(path, specials=["<|endoftext|>", "<|pad|>"])
    for bundle in (None, ""):
        tok = load_tokenizer(path, bundle)
        assert type(tok) is EETokenizer
        assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, None)
        assert tok.eos_ids == (tok.eos_id,) == (0,)
        assert tok.chat_template is None
        assert tok.decode(tok.encode("def f(): 🚀")) == "def f(): 🚀"
        with pytest.raises(ValueError, match=r"no chat template \(a nemo_ee-trained model\)"):
            tok.apply_chat_template(MESSAGES)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "none.json")
