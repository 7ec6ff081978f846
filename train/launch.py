"""Start one stage the way a user would: `torchrun ... -m train STAGE --config FILE overrides` (argv, no shell).

Used by `tdg demo` (always CPU) and `tdg ablation` (the node's GPUs when it has them). A stop
request (SIGUSR1 from Slurm's `--signal`, or SIGTERM) reaching the launching process is passed
on to the stage, which checkpoints and exits; the launcher then raises `StageStopped` so the
caller can exit with EXIT_CHECKPOINTED and be requeued. Rerunning resumes the stage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from train.engine.distributed import free_port
from train.errors import StageStopped, TdgError

# torchrun gives its workers this long to checkpoint after it forwards SIGTERM (newer torch
# reads the variable; older torch waits a fixed 30 s).
SHUTDOWN_SECONDS = "600"


def launch_stage(stage: str, config: str | Path, overrides: list[str], nproc: int, label: str,
                 rerun_hint: str, cpu: bool = True) -> None:
    """Run `stage` with `nproc` processes (CPU/gloo if `cpu`, else the environment's accelerator). A stage whose
    output dir is already finished is not launched: a resumed demo or ablation skips it in no time, instead of
    starting `nproc` processes to find DONE.json."""
    if _finished(stage, config, overrides):
        return
    args = ["-m", "train", stage, "--config", str(config), *overrides]
    cmd = [sys.executable, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    how = "data parallel" if stage == "eval" else "DeepSpeed"
    print(f"[{label}] stage {stage}: {nproc} process(es), {how} on {'CPU' if cpu else 'the accelerator'}",
          flush=True)
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": SHUTDOWN_SECONDS}
    if cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    code, stopped = _run_forwarding_stop(cmd, env, to_torchrun=nproc > 1)
    if stopped:
        raise StageStopped(f"{label} (stage {stage}) stopped on request (exit status {code}); {rerun_hint}")
    if code != 0:
        raise TdgError(f"{label} (stage {stage}) failed with exit status {code} (its log is above); {rerun_hint}")


def _finished(stage: str, config: str | Path, overrides: list[str]) -> bool:
    from train import config as configs
    from train.stage_table import STAGES
    from train.stages.common import already_done

    cfg = configs.load_config(getattr(configs, STAGES[stage][2]), config, overrides)
    return already_done(stage, Path(cfg.engine.output_dir), asdict(cfg))


def _run_forwarding_stop(cmd: list[str], env: dict[str, str], to_torchrun: bool) -> tuple[int, bool]:
    """Run `cmd`; forward USR1/TERM to it (as TERM to torchrun, which passes TERM to its workers)."""
    proc = subprocess.Popen(cmd, env=env)
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        proc.send_signal(signal.SIGTERM if to_torchrun else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, bool(received)
