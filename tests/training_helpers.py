"""The training CLI as the tests run it: a subprocess of `python -m training` (or torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_training(root: Path, *args: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    """`python -m training ARGS` from the checkout, one OpenMP thread; `nproc`: under torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "training", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "training", *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
