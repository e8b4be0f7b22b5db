"""The model's own greedy answers to chat prompts (made from the stdlib's train split), as EE-Tuning data.

    python scripts/make_tuning_data.py --nemo smollm2.nemo --out answers.npy --num-prompts 64 --max-tokens 128
    python scripts/ee_tune.py restore_from=ee.nemo output=tuned.nemo 'data.token_files=[answers.npy]' data.corpus=false

Writes a 1-D token stream (chat template + answer per conversation) and a .json of statistics beside it.
"""
from nemo_ee.tuning.self_data import main

if __name__ == "__main__":
    main()
