"""The configuration reference is generated from the dataclasses and kept current."""
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Optional

from nemo_ee.config_reference import SOURCES, _load, render, render_class

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class _Example:
    """An example config."""

    # ---- first part -----
    alpha: int = 3  # how many alphas
    beta: Optional[str] = None
    # ---- second part ----
    gamma: list = dataclasses.field(default_factory=lambda: [1, 2])  # a | b


def test_rendering_reads_types_defaults_comments_and_sections():
    text = render_class("here", _Example)
    assert "## _Example — here" in text and "An example config." in text
    assert "**first part**" in text and "**second part**" in text
    assert "| `alpha` | `int` | `3` | how many alphas |" in text
    assert "| `beta` | `Optional[str]` | `None` |  |" in text
    assert "| `gamma` | `list` | `[1, 2]` | a \\| b |" in text
    assert text.index("alpha") < text.index("**second part**") < text.index("gamma")


def test_every_documented_field_has_a_meaning_and_the_file_is_current():
    text = render()
    for _, path in SOURCES:
        for f in dataclasses.fields(_load(path)):
            assert f"| `{f.name}` |" in text, f.name
    empty = [line for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert not empty, empty
    assert (REPO / "docs" / "config_reference.md").read_text() == text, \
        "docs/config_reference.md is stale: run python scripts/gen_config_reference.py"
    check = subprocess.run([sys.executable, "scripts/gen_config_reference.py", "--check"], cwd=REPO,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
