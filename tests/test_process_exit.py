"""A `tdg` / `python -m train` process ends with its own status even while a torch thread is still running.

The failure this guards against: a stage finished its work, then aborted during interpreter finalisation
(SIGABRT, "terminate called without an active exception") because a torch background thread re-took the GIL
(pytorch/pytorch#190489); torchrun and Slurm saw a failed stage. The tests reproduce it deterministically with a
daemon thread running backward passes: under plain `raise SystemExit(main())` that process aborted in 10 of 10
runs on this machine.
"""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, stage_env

BUSY_TORCH_THREAD = """
import atexit, sys, threading, time
import torch

def backward_forever():
    x = torch.randn(256, 256, requires_grad=True)
    while True:
        (x @ x).tanh().sum().backward()

threading.Thread(target=backward_forever, daemon=True).start()
time.sleep(0.3)
atexit.register(lambda: print("atexit handler ran", flush=True))
"""


def _run(program: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BUSY_TORCH_THREAD + textwrap.dedent(program)], env=stage_env(),
                          capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("entry", ["python -m train", "tdg"])
@pytest.mark.parametrize(("args", "status"), [(["--help"], 0), (["prepare", "--input", "/nonexistent/x.jsonl",
                                                                  "--output", "/nonexistent/out"], 2)])
def test_the_commands_exit_with_their_status_while_a_torch_thread_runs(entry, args, status):
    """Both entry points (torchrun launches `python -m train`; users type `tdg`): --help exits 0 with its text
    on a block-buffered pipe, a user error exits 2 with its one line, and the atexit handlers still ran."""
    if entry == "tdg":
        program = f"sys.argv = ['tdg', *{args!r}]\nfrom train.cli import entry\nsys.exit(entry())\n"
    else:
        program = f"sys.argv = ['train', *{args!r}]\nimport runpy\nrunpy.run_module('train', run_name='__main__')\n"
    r = _run(program)
    assert "terminate called" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == status, r.stdout[-2000:] + r.stderr[-3000:]
    assert "atexit handler ran" in r.stdout
    if status == 0:
        assert "usage:" in r.stdout and r.stdout.rstrip().endswith("atexit handler ran")
    else:
        assert "error:" in r.stderr and "/nonexistent/x.jsonl" in r.stderr


def test_an_uncaught_exception_prints_its_traceback_and_exits_1():
    r = _run("""
    from train.engine.process_exit import run_then_exit
    def main():
        raise RuntimeError("something unexpected")
    run_then_exit(main)
    """)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" in r.stderr and "RuntimeError: something unexpected" in r.stderr
    assert "terminate called" not in r.stderr and "atexit handler ran" in r.stdout


def test_a_non_daemon_thread_finishes_before_the_process_exits(tmp_path):
    """Python joins non-daemon threads before it exits; so does the hard exit (a writer left running loses
    nothing)."""
    marker = tmp_path / "written"
    r = _run(f"""
    from train.engine.process_exit import run_then_exit
    def write_later():
        time.sleep(1)
        open({str(marker)!r}, "w").write("done")
    threading.Thread(target=write_later).start()
    run_then_exit(lambda: 0)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.read_text() == "done"


def test_the_export_tool_ends_like_the_commands():
    r = _run(f"sys.argv = ['export.py', '--help']\nimport runpy\nrunpy.run_path({str(REPO / 'tools' / 'export.py')!r}, "
             "run_name='__main__')\n")
    assert r.returncode == 0 and "terminate called" not in r.stderr, r.stderr[-3000:]
    assert "usage: tdg export" in r.stdout and "atexit handler ran" in r.stdout
