"""Add exit heads to a trained early-exit GPT .nemo (EE-Tuning, step 1).

    python scripts/add_exits.py --in model.nemo --out ee.nemo --exit-layers 4 8
    python scripts/add_exits.py --in model.nemo --out ee.nemo --exit-fractions 0.25 0.5 --exit-mlp --random-init

Backbone weights and tokenizer are copied bit-exactly; exits already in the model are replaced;
exit output weights are untied. Single process, TP=PP=1. See nemo_ee/tuning/add_exits.py.
"""
from nemo_ee.tuning.add_exits import main

if __name__ == "__main__":
    main()
