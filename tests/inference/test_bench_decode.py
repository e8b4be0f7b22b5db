"""scripts/bench_decode.py --quick on a tiny .nemo: CSV columns and values, the PNG, the RESULT line; bench helpers."""
import csv
import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

from nemo_ee.inference import bench
from nemo_ee.inference.policies import ExitRule

REPO = Path(__file__).resolve().parents[2]
RESULT = re.compile(r"^RESULT efficiency=(\S+) speedup_at_98=(\S+) selfspec_speedup=(\S+) "
                    r"selfspec_identical=(true|false) batched_speedup=(\S+)$")


def test_thresholds_operating_point_and_prediction():
    values = bench.thresholds(0.05)
    assert len(values) == 21 and values[0] == 1.0 and values[-1] == 0.0 and values[10] == 0.5
    assert bench.thresholds(0.3) == [1.0, 0.7, 0.4, 0.1, 0.0]
    rows = [{"threshold": t, "agreement": a} for t, a in ((1.0, 1.0), (0.8, 0.99), (0.6, 0.97), (0.4, 0.985))]
    assert bench.operating_point(rows, 0.98)["threshold"] == 0.4  # the loosest passing, not the first failure
    assert bench.operating_point(rows, 0.999)["threshold"] == 1.0
    assert bench.operating_point(rows, 1.01) is None
    # every draft accepted: k+1 tokens for k drafts + one verification
    assert bench.predicted_selfspec(1.0, 3, 0.25, 1.0) == pytest.approx(4 / 1.75)
    assert bench.predicted_selfspec(0.0, 3, 0.25, 1.0) == pytest.approx(1 / 1.75)


def test_picked_nll_takes_the_first_exit_that_fires():
    tf = bench.TeacherForced(
        conf={0: torch.tensor([0.9, 0.2, 0.6, 0.1]), 1: torch.tensor([0.1, 0.95, 0.7, 0.2])},
        nll={0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 1: torch.tensor([10.0, 20.0, 30.0, 40.0])},
        argmax={0: torch.tensor([1, 2, 3, 4]), 1: torch.tensor([1, 2, 3, 0])},
        final_nll=torch.tensor([100.0, 200.0, 300.0, 400.0]), final_argmax=torch.tensor([1, 2, 0, 0]))
    pick = lambda t: tf.picked_nll(ExitRule("max_prob", t), [0, 1], "max_prob").tolist()  # noqa: E731
    assert pick(0.5) == [1.0, 20.0, 3.0, 400.0]
    assert pick(0.65) == [1.0, 20.0, 30.0, 400.0]
    assert pick(1.01) == [100.0, 200.0, 300.0, 400.0]
    assert pick(0.0) == [1.0, 2.0, 3.0, 4.0]
    only_second = ExitRule("max_prob", 0.5, active=frozenset({1}))
    assert tf.picked_nll(only_second, [0, 1], "max_prob").tolist() == [100.0, 20.0, 30.0, 400.0]
    assert tf.acceptance(0) == 0.5 and tf.acceptance(1) == 0.75


@pytest.fixture(scope="module")
def nemo_file(tmp_path_factory, world):
    from nemo_ee.models.nemo_model import EarlyExitGPTNeMoModel, prepare_config
    from tests.models.test_nemo_model import recipe

    root = tmp_path_factory.mktemp("bench_nemo")
    cfg = prepare_config(recipe(root / "run", 1).model)  # 4 layers, hidden 64, exits after layers 1 and 2
    path = root / "m.nemo"
    EarlyExitGPTNeMoModel(cfg).save_to(str(path))
    return path


@pytest.mark.slow
def test_quick_run_writes_csv_png_and_result(nemo_file, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "scripts" / "bench_decode.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    script.main(["--quick", "--nemo", str(nemo_file), "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()

    match = RESULT.match(printed[-1])
    assert match, printed[-1]
    e, s, p, identical, b = match.groups()
    assert all(math.isfinite(float(x)) and float(x) > 0 for x in (e, s, p, b))
    assert identical == "true"  # self-speculative greedy decoding is lossless

    with open(out / "sweep.csv") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    assert list(rows[0]) == list(bench.CSV_COLUMNS) + ["share_l1", "share_l2", "share_l4"]
    assert [float(r["threshold"]) for r in rows] == [1.0, 0.75, 0.5, 0.25, 0.0]
    for r in rows:
        values = {k: float(v) for k, v in r.items()}
        assert all(math.isfinite(v) for v in values.values()), r
        assert values["ideal_speedup"] == pytest.approx(4 / values["mean_depth"], abs=2e-3)
        assert values["efficiency"] == pytest.approx(values["speedup"] / values["ideal_speedup"], abs=2e-3)
        assert values["share_l1"] + values["share_l2"] + values["share_l4"] == pytest.approx(1.0, abs=2e-3)
    strict, loose = ({k: float(v) for k, v in r.items()} for r in (rows[0], rows[-1]))
    # max-prob >= 1.0 never fires on an untrained model: the full model's tokens, all at depth 4
    assert strict["mean_depth"] == 4.0 and strict["agreement"] == 1.0 and strict["agreement_prefix"] == 1.0
    # >= 0.0 always fires: every token leaves at the first exit, perplexity is that exit's
    assert loose["mean_depth"] == 1.0 and loose["share_l1"] == 1.0 and loose["ideal_speedup"] == 4.0
    assert loose["val_ppl"] != strict["val_ppl"]

    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
