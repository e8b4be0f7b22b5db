"""Parallel plumbing: process groups and the megatron schedules with exit losses."""
from nemo_ee.compat import cpu as _cpu

_cpu.apply()
