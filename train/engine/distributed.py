"""Process-group setup and the few collectives the loop needs.

Launch with torchrun or srun: RANK/WORLD_SIZE/LOCAL_RANK (or SLURM_PROCID/...) come from the
environment. A plain `python -m train ...` with none of them runs as a world of one.
`DS_ACCELERATOR=cpu` selects DeepSpeed's CPU accelerator; collectives then use gloo.
"""

from __future__ import annotations

import atexit
import datetime
import os
import warnings

import torch
import torch.distributed as dist


def _env_from_slurm() -> None:
    """srun without torchrun: derive torch's variables from Slurm's."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def launch_rank() -> int:
    """This process's rank before any process group exists: torchrun's RANK, or srun's SLURM_PROCID."""
    _env_from_slurm()
    return int(os.environ.get("RANK", "0"))


def free_port() -> int:
    """A TCP port nothing listens on right now (for single-node rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()


def setup(timeout_minutes: float = 60, use_deepspeed: bool = True) -> torch.device:
    """Initialise the process group (once) and return this rank's device. Collectives wait up to
    `timeout_minutes` (engine.dist_timeout_minutes) before failing: long enough for rank 0 to write a
    large save or convert a universal checkpoint while the others wait at a barrier. Without `use_deepspeed`
    (eval, sample) plain torch.distributed is set up: no DeepSpeed import, no op to build."""
    _env_from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a single process: any free port will do
        os.environ["MASTER_PORT"] = str(free_port())
    deepspeed = _import_deepspeed() if use_deepspeed else None  # eval, sample: nothing trains, no DeepSpeed
    if not dist.is_initialized():
        backend = "gloo" if on_cpu() else "nccl"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if deepspeed is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            if on_cpu():  # its CPU op is built here, under a lock a killed build cannot leave behind
                from train.engine.op_build import build_cpu_comm_op

                build_cpu_comm_op(announce=launch_rank() == 0)
            deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
            _clone_world_group(timeout)
        atexit.register(_shutdown)  # on every way out: return, error exit, uncaught exception
    return _device()


def _import_deepspeed():
    """DeepSpeed, on DeepSpeed's CPU accelerator where there is no GPU, with its per-step deprecation warnings
    silenced."""
    if on_cpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # DeepSpeed calls torch collectives that torch 2.13 deprecates, every step: keep logs readable.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+. is deprecated", category=FutureWarning)
    # peft reads model.is_gradient_checkpointing, which transformers 5 deprecates: once per rank and load
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing. is deprecated", category=FutureWarning)
    return deepspeed


def _device() -> torch.device:
    """This rank's device (its local GPU, selected), or the CPU."""
    if on_cpu():
        return torch.device("cpu")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _clone_world_group(timeout: datetime.timedelta) -> None:
    """Create DeepSpeed's clone of the world group (its data-parallel group, used by every ZeRO collective)
    with our timeout. DeepSpeed clones it lazily with `new_group(ranks)`, which takes torch's default
    (10 min for NCCL), not the world group's: a rank-0 save longer than that failed the others' wait."""
    from deepspeed.utils import groups

    if not hasattr(groups, "_WORLD_GROUP"):  # a private name: a DeepSpeed that renamed it keeps its own timeout
        warnings.warn("this DeepSpeed has no groups._WORLD_GROUP: its data-parallel group keeps torch's default "
                      "collective timeout, not engine.dist_timeout_minutes", stacklevel=2)
    elif groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def _shutdown() -> None:
    """Destroy the process group while the interpreter is whole. Left to exit, gloo's worker threads
    can still hold tensors whose release needs the GIL during finalisation: the process then aborts
    (SIGABRT, "terminate called without an active exception") after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def equal_share(batches: list) -> list[tuple[object, bool]]:
    """This rank's share (every W-th) of `batches` as (batch, counted), padded with (batches[0], False) so that
    every rank makes the same number of forward calls: ZeRO-3 gathers the weights in each, a collective."""
    mine = batches[rank()::world()]
    calls = -(-len(batches) // world())
    return [(mine[k], True) if k < len(mine) else (batches[0], False) for k in range(calls)]


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (a signal often reaches only some)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def raise_if_any(problem: str | None) -> None:
    """Collective: every rank raises TdgError if any rank has a problem (each rank's message, by rank), so
    no rank is left waiting in a collective for one that failed alone (a full disk, a bad file)."""
    from train.errors import TdgError

    problems = [f"rank {r}: {p}" for r, p in enumerate(all_gather_object(problem)) if p]
    if problems:
        raise TdgError("; ".join(problems))
