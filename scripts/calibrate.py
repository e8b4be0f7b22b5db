"""Calibrate per-exit thresholds of an early-exit .nemo and write them into its config (run with --help).

    python scripts/calibrate.py --nemo ee.nemo --out ee_calibrated.nemo --target 0.98 --policy max_prob
    python scripts/calibrate.py --nemo ee.nemo --in-place --prompts-file prompts.json

Method and output: nemo_ee/inference/calibrate.py; command line: nemo_ee/inference/cli.py.
"""
import sys

from nemo_ee.inference.cli import calibrate_main

if __name__ == "__main__":
    sys.exit(calibrate_main())
