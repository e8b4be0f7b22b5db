"""EE-Tuning: add exits to a trained (exit-free or early-exit) GPT and tune only them."""
from nemo_ee.tuning.add_exits import add_exits, exit_layers_from_fractions

__all__ = ["add_exits", "exit_layers_from_fractions"]
