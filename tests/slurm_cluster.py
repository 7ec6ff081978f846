"""A real single-node Slurm for the tests: Debian's slurm-wlm + munge, started by hand (no systemd).

`SlurmCluster.start(tmp)` installs the packages if they are missing (needs root and apt), writes
a cgroup-free slurm.conf under `tmp`, starts munged, slurmctld and slurmd, and waits until the
node is idle. `stop()` kills only the processes it started, by pid. `SlurmUnavailable` says why
Slurm could not be had, so tests can skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from train.engine.distributed import free_port


class SlurmUnavailable(Exception):
    pass


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and this is not a root Debian machine to install it on")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env, timeout=600)
    r = _run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], env=env, timeout=1200)
    if r.returncode != 0 or not shutil.which("slurmctld"):
        raise SlurmUnavailable(f"apt-get install slurm-wlm munge failed: {r.stderr[-500:]}")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.pids: list[int] = []
        rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
        self.env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, root: Path) -> SlurmCluster:
        ensure_installed()
        cluster = cls(root)
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_munge(self) -> None:
        if _run(["pgrep", "-x", "munged"]).returncode == 0:
            return  # one is already serving this machine
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        r = _run(["runuser", "-u", "munge", "--", "munged", "--force"])
        if r.returncode != 0:
            raise SlurmUnavailable(f"munged would not start: {r.stderr[-500:]}")
        pid_file = Path("/run/munge/munged.pid")
        for _ in range(50):
            if pid_file.is_file():
                self.pids.append(int(pid_file.read_text().strip()))
                return
            time.sleep(0.1)

    def _start(self) -> None:
        self._start_munge()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = free_port(), free_port()
        self.conf.write_text(f"""\
ClusterName=tdgtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=20
MinJobAge=600
InactiveLimit=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmctld", "slurmd"):
            r = _run([daemon, "-f", str(self.conf)], env=self.env)
            if r.returncode != 0:
                raise SlurmUnavailable(f"{daemon} would not start: {r.stderr[-500:]}")
            pid_file = self.root / f"{daemon}.pid"
            for _ in range(100):
                if pid_file.is_file() and pid_file.read_text().strip():
                    self.pids.append(int(pid_file.read_text().strip()))
                    break
                time.sleep(0.1)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = _run(["sinfo", "-h", "-o", "%T"], env=self.env).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        log = (self.root / "log" / "slurmctld.log").read_text()[-1500:]
        raise SlurmUnavailable(f"the node never became idle (state {state!r}); slurmctld log:\n{log}")

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})}, **kw)

    def job_state(self, job_id: str) -> str:
        out = self.run(["scontrol", "show", "job", job_id]).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for(self, job_id: str, states: set[str], timeout: float = 600) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        self.pids.clear()
