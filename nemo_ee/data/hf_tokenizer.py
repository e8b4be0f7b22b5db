"""An imported model's own Hugging Face tokenizer (transformers' fast tokenizer), kept as the model has it.

A .nemo made from an HF (or GGUF) checkpoint stores two tokenizer artifacts: ``tokenizer.json`` (the
``tokenizers`` file, verbatim) and ``hf_tokenizer.json``, a bundle of the small files that complete it
(``tokenizer_config.json``, ``chat_template.jinja``, ``special_tokens_map.json``, the ``model_type`` of
``config.json``) plus the stop ids of the model's ``generation_config.json``, so that transformers builds
the same tokenizer as ``AutoTokenizer.from_pretrained`` on the original folder. Nothing is appended to the vocabulary: eos, bos and pad are the model's
own (a model without a pad token has none), and a chat template, when the model has one, is applied by
transformers itself.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from nemo_ee.data.tokenizer import EETokenizer

BUNDLE_FORMAT = "nemo_ee.hf_tokenizer/1"
BUNDLE_NAME = "hf_tokenizer.json"
# the files of an HF tokenizer folder that the bundle carries (tokenizer.json is its own artifact)
BUNDLED_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                 "config.json")  # config.json: only its model_type


def _ids(value: Any) -> list[int]:
    """An HF ``eos_token_id`` field (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"eos_token_id={value!r} must be an id >= 0 or a list of them")
    return [int(v) for v in values]


def write_bundle(hf_dir: str | Path, out: str | Path) -> Path:
    """Write the bundle of the HF tokenizer folder ``hf_dir`` to ``out``: its small tokenizer files and the
    stop ids of its ``generation_config.json`` (or, without one, ``config.json``'s ``eos_token_id``)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {hf_dir} (a transformers fast tokenizer is needed)")
    files = {name: (hf_dir / name).read_text(encoding="utf-8") for name in BUNDLED_FILES if (hf_dir / name).is_file()
             and name != "config.json"}
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type") if (
        hf_dir / "config.json").is_file() else None
    if model_type:  # transformers picks a family's tokenizer class by it when tokenizer_config.json names none
        files["config.json"] = json.dumps({"model_type": model_type})
    eos: list[int] = []
    for source in ("generation_config.json", "config.json"):
        path = hf_dir / source
        if path.is_file():
            eos = _ids(json.loads(path.read_text()).get("eos_token_id"))
            if eos:
                break
    out.write_text(json.dumps({"format": BUNDLE_FORMAT, "files": files, "generation_eos_token_ids": eos},
                              indent=1, sort_keys=True), encoding="utf-8")
    return out


def read_bundle(path: str | Path) -> dict:
    """The bundle at ``path``, checked (a bad or foreign file is a clear error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HF tokenizer bundle {str(path)!r} does not exist")
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"HF tokenizer bundle {path} is not JSON: {err}") from None
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is not an HF tokenizer bundle (format {BUNDLE_FORMAT!r})")
    files = bundle.get("files")
    if not isinstance(files, dict) or not all(k in BUNDLED_FILES and isinstance(v, str) for k, v in files.items()):
        raise ValueError(f"{path}: 'files' must map some of {list(BUNDLED_FILES)} to their text")
    bundle["generation_eos_token_ids"] = _ids(bundle.get("generation_eos_token_ids"))
    return bundle


class HFTokenizer:
    """transformers' tokenizer of an imported model, with the interface the rest of nemo_ee uses
    (:class:`nemo_ee.data.tokenizer.EETokenizer`'s) plus chat templates and several stop ids."""

    def __init__(self, tokenizer_file: str | Path, bundle_file: str | Path) -> None:
        from transformers import AutoTokenizer

        tokenizer_file, bundle_file = Path(tokenizer_file), Path(bundle_file)
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"tokenizer file {str(tokenizer_file)!r} does not exist")
        self._json = tokenizer_file.read_text(encoding="utf-8")
        self._bundle = read_bundle(bundle_file)
        self.path: Optional[Path] = tokenizer_file
        self.bundle_path: Optional[Path] = bundle_file
        with tempfile.TemporaryDirectory(prefix="nemo_ee_hf_tokenizer_") as tmp:
            self._write_folder(Path(tmp))
            self.hf = AutoTokenizer.from_pretrained(tmp)
        # generation_config's stop ids first (what HF generate stops at), then the tokenizer's eos; an id the
        # tokenizer does not have (a stale default in a config) can never be generated and is left out
        self.eos_ids: tuple[int, ...] = tuple(i for i in dict.fromkeys(
            self._bundle["generation_eos_token_ids"] + _ids(self.hf.eos_token_id)) if i < len(self.hf))
        self.eos_id: Optional[int] = self.eos_ids[0] if self.eos_ids else None
        self.pad_id: Optional[int] = self.hf.pad_token_id
        self.bos_id: Optional[int] = self.hf.bos_token_id

    def _write_folder(self, folder: Path, config: bool = True) -> None:
        (folder / "tokenizer.json").write_text(self._json, encoding="utf-8")
        for name, text in self._bundle["files"].items():
            if config or name != "config.json":
                (folder / name).write_text(text, encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.hf)

    @property
    def fingerprint(self) -> str:
        """sha1 of tokenizer.json and the bundle, so caches notice any tokenizer change."""
        blob = self._json + json.dumps(self._bundle, sort_keys=True)
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()

    @property
    def chat_template(self) -> Optional[str]:
        return self.hf.chat_template

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, as the model's tokenizer makes them (its own special tokens, e.g. a bos its
        post-processor adds, included)."""
        return list(self.hf(text)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.hf(list(texts))["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat ``messages`` ([{"role": ..., "content": ...}]) through the model's chat template."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
        check_messages(messages)
        out = self.hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def save_files(self, folder: str | Path) -> dict[str, str]:
        """Write tokenizer.json and the bundle into ``folder``; returns the ``tokenizer`` config entries."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self._json, encoding="utf-8")
        (folder / BUNDLE_NAME).write_text(json.dumps(self._bundle, indent=1, sort_keys=True), encoding="utf-8")
        return {"tokenizer_file": str(folder / "tokenizer.json"), "hf_tokenizer_file": str(folder / BUNDLE_NAME)}

    def save_pretrained(self, folder: str | Path) -> None:
        """The HF tokenizer folder (tokenizer.json, tokenizer_config.json, chat template ...), for export (the
        model's config.json is the exporter's)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._write_folder(folder, config=False)


ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 256


def check_messages(messages: Any) -> list[dict]:
    """Chat messages as a list of {"role", "content"} dicts with string content, or a ValueError naming the
    first bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"{len(messages)} messages; at most {MAX_MESSAGES}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content' (and optionally 'name'), "
                             f"got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role={m['role']!r} is not one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    return list(messages)


def load_tokenizer(tokenizer_file: str | Path, hf_tokenizer_file: str | Path | None = None):
    """The tokenizer of a model: its HF tokenizer when the model was imported (a bundle is given), else
    nemo_ee's own byte-level BPE (:class:`~nemo_ee.data.tokenizer.EETokenizer`)."""
    if hf_tokenizer_file:
        return HFTokenizer(tokenizer_file, hf_tokenizer_file)
    return EETokenizer.from_file(tokenizer_file)
