"""Test-session settings.

``make test`` runs the tests in one pytest-xdist worker per core. Each worker then computes on one torch thread,
so that the workers do not contend for the cores, and the subprocesses the tests start (examples, the CLI,
interrupted fits) inherit one thread through ``OMP_NUM_THREADS``. A plain ``pytest`` run keeps torch's default.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
