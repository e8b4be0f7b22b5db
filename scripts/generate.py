"""Generate text with an early-exit .nemo; prints each continuation and a STATS line (conf/ee_generate.yaml).

    python scripts/generate.py nemo=m.nemo prompts='["def f(", "import "]' threshold=0.8 show_exits=true
    python scripts/generate.py nemo=m.nemo prompts_file=prompts.txt max_tokens=128 decode_mode=full

Thresholds default to the .nemo's calibrated ones (scripts/calibrate.py). Logic: nemo_ee/inference/cli.py.
"""
from nemo.core.config import hydra_runner

from nemo_ee.inference.cli import run_command, run_generate


@hydra_runner(config_path="../conf", config_name="ee_generate")
def main(cfg) -> None:
    code = run_command(lambda: run_generate(cfg))
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
