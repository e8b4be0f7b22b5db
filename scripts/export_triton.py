"""Write a Triton model repository serving an early-exit .nemo (run with --help).

    python scripts/export_triton.py --nemo ee.nemo --repository triton_repo [--name ee_gpt]

Layout, parameters and how to serve it with an NGC Triton container: nemo_ee/deploy/triton/repository.py.
"""
import sys

from nemo_ee.deploy.triton.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
