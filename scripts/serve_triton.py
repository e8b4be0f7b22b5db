"""Serve a model repository written by export_triton.py with a real tritonserver on 127.0.0.1 (run with --help).

    python scripts/serve_triton.py --repository triton_repo [--http-port 8000 --grpc-port 8001]

Waits for /v2/health/ready, then serves until Ctrl-C. What the Python stub needs: nemo_ee/deploy/triton/server.py.
"""
import sys

from nemo_ee.deploy.triton.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
