"""Deployment of early-exit models: a Triton Inference Server model repository and its Python backend."""
