"""Convert an early-exit GPT distributed checkpoint to another TP/PP layout.

    torchrun --nproc_per_node N*M scripts/reshard.py --in SRC --out DST --tp N --pp M
    python scripts/reshard.py --in SRC --out DST                  # to TP=1, PP=1
"""
from nemo_ee.checkpoint.reshard import main

if __name__ == "__main__":
    main()
