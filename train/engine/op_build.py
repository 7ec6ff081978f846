"""DeepSpeed's CPU communication op, built once per environment, never hung on a killed build.

On CPU, DeepSpeed JIT-compiles its shared-memory op (`deepspeed_shm_comm`) when its process group starts.
PyTorch guards the build with a `lock` file that only the builder removes: a build killed midway (Ctrl-C,
preemption, OOM) leaves it behind, and every later start waits on it forever without a word
(DeepSpeedExamples#302, transformers#26015). Here the build runs under an flock in the extensions dir, so
the flock's holder is the only live builder: a `lock` file it finds was left by a killed build, and is
removed and named. Where the op cannot be built (no C++ compiler), collectives run on plain gloo.
`tdg demo` starts the build in the background while it writes its data, so its first stage finds it built.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

GUARD = ".tdg-build.lock"  # the flock every tdg process holds while it builds or loads the op


def extensions_root() -> Path:
    """Where torch builds JIT ops: TORCH_EXTENSIONS_DIR if set, else one dir per Python environment (under it
    when writable), so that two installs with different torch builds never rebuild or load each other's op."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        prefix = Path(sys.prefix)
        per_env = (prefix / "torch_extensions" if os.access(prefix, os.W_OK) else
                   Path.home() / ".cache" / "torch_extensions" / hashlib.sha1(str(prefix).encode()).hexdigest()[:12])
        os.environ["TORCH_EXTENSIONS_DIR"] = str(per_env)
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def build_cpu_comm_op(announce: bool = True) -> bool:
    """Build or load DeepSpeed's CPU shared-memory op before DeepSpeed starts its process group (which then
    finds it loaded). Returns False when it cannot be built: DeepSpeed is told the op is unavailable and
    uses plain gloo; `announce` (one rank) says so once."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / GUARD, "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        stale = root / builder.name / "lock"
        if stale.exists():
            stale.unlink(missing_ok=True)
            print(f"[tdg] removed {stale}: a build of {builder.name} was killed midway and left it behind "
                  "(no live build holds it)", file=sys.stderr, flush=True)
        try:
            builder.load(verbose=False)
            return True
        except Exception as e:  # noqa: BLE001 - any build failure leaves the slower, op-free path
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
            if announce:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"[tdg] warning: DeepSpeed's CPU op {builder.name} could not be built in {root} ({reason}); "
                      "collectives run on plain gloo, slower on one node (install a C++ compiler and ninja to "
                      "build it)", file=sys.stderr, flush=True)
            return False


def build_in_background() -> subprocess.Popen | None:
    """Start building the op in a process of its own, to overlap the caller's single-core work (the demo's data
    and tokenizer): the stages' processes then wait on its flock instead of building. None when an op is
    already built here. A build that fails here is tried again, and reported, by the stages."""
    if any(extensions_root().glob("*/*.so")):
        return None
    return subprocess.Popen([sys.executable, "-c", "from train.engine.op_build import build_cpu_comm_op as b; "
                             "b(announce=False)"], env={**os.environ, "DS_ACCELERATOR": "cpu"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
