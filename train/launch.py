"""Start one stage the way a user would: `torchrun ... -m train STAGE --config FILE overrides` (argv, no shell)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train.engine.distributed import free_port
from train.errors import TdgError


def launch_stage(stage: str, config: str | Path, overrides: list[str], nproc: int, label: str,
                 rerun_hint: str) -> None:
    """Run `stage` with `nproc` processes on CPU (gloo); raise TdgError naming `label` if it fails."""
    args = ["-m", "train", stage, "--config", str(config), *overrides]
    cmd = [sys.executable, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    how = "data parallel" if stage == "eval" else "DeepSpeed"
    print(f"[{label}] stage {stage}: {nproc} process(es), {how} on CPU", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise TdgError(f"{label} (stage {stage}) failed with exit status {code} (its log is above); {rerun_hint}")
