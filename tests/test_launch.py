"""Stop requests reach a launched stage's workers through torchrun, and the launcher reports them."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from train.launch import _run_forwarding_stop

WORKER = """
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    (out / f"stopped-{os.environ.get('RANK', '0')}-{signal.Signals(signum).name}").touch()
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
(out / f"ready-{os.environ.get('RANK', '0')}").touch()
time.sleep(120)
"""


def _signal_self_when(ready: list[Path], signum: int) -> threading.Thread:
    def wait_then_signal() -> None:
        deadline = time.time() + 60
        while not all(p.exists() for p in ready) and time.time() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signum)

    t = threading.Thread(target=wait_then_signal, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_request_reaches_every_torchrun_worker(tmp_path: Path, signum: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "0", str(script), str(tmp_path)]
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    t = _signal_self_when([tmp_path / "ready-0", tmp_path / "ready-1"], signum)
    code, stopped = _run_forwarding_stop(cmd, dict(os.environ), to_torchrun=True)
    t.join()
    assert stopped and code != 0
    # torchrun passes SIGTERM on; each worker ran its stop handler (checkpoint, exit 75)
    assert {p.name for p in tmp_path.glob("stopped-*")} == {"stopped-0-SIGTERM", "stopped-1-SIGTERM"}
    assert {s: signal.getsignal(s) for s in before} == before  # the launcher's handlers are gone again


def test_single_process_gets_the_signal_itself_and_no_signal_means_not_stopped(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    t = _signal_self_when([tmp_path / "ready-0"], signal.SIGUSR1)
    code, stopped = _run_forwarding_stop([sys.executable, str(script), str(tmp_path)], dict(os.environ),
                                         to_torchrun=False)
    t.join()
    assert (code, stopped) == (75, True)
    assert (tmp_path / "stopped-0-SIGUSR1").exists()
    assert _run_forwarding_stop([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), False) == (3, False)
