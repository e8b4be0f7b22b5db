"""Query the early-exit model on Triton (run with --help).

    python scripts/query_triton.py 'def main(' --max-tokens 32 --stream --show-exits     # gRPC streaming
    python scripts/query_triton.py 'import ' --protocol http --threshold 0.8            # HTTP generate endpoint

Prints the prompt and its continuation (with --show-exits each token as text⟨depth⟩), then a summary line.
"""
import sys

from nemo_ee.deploy.triton.cli import query_main

if __name__ == "__main__":
    sys.exit(query_main())
