"""Version and device compatibility: the only place nemo_ee adapts to its environment."""
