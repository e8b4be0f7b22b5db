"""Serving an early-exit .nemo on Triton Inference Server.

- :mod:`.interface`: the tensor names, types and shapes (TensorRT-LLM's names where they exist);
- :mod:`.repository`: writes the model repository (config.pbtxt, model.py, the checkpoint);
- :mod:`.backend`: request validation and the in-flight-batching decode loop behind model.py;
- :mod:`.server`: starts a real ``tritonserver`` on loopback with what its Python stub needs;
- :mod:`.client`: tritonclient (gRPC streaming) and HTTP ``generate`` helpers.

Only :mod:`.backend` needs torch; :mod:`.interface`, :mod:`.client` and :mod:`.server` do not.
"""
