"""Convert a plain GPT megatron-core / NeMo-2 distributed checkpoint into a .nemo early-exit GPT (no exits yet).

    python scripts/convert_megatron_to_nemo.py --ckpt DIR --out model.nemo [--arch YAML] [--tokenizer DIR] [KEY=VALUE ...]

DIR is a megatron-core torch_dist checkpoint (metadata.json, *.distcp; e.g. a Megatron-LM iter_* folder) or a
NeMo-2 checkpoint (weights/, context/model.yaml). Run with --help for the details and examples.
"""
from nemo_ee.checkpoint.megatron_dist import main

if __name__ == "__main__":
    main()
