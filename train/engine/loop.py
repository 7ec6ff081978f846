"""The DeepSpeed training loop shared by every training stage.

A stage supplies a `TrainTask` (model with its trainable parameters marked, tokenized data,
loss, how to save the result); the loop supplies everything else: DeepSpeed initialisation,
length-grouped or packed batches split over ranks, warmup + cosine LR, gradient accumulation
and clipping, TensorBoard, progress bar, checkpoints with the exact data position, resume (on
any world size), stop signals, verified final save and DONE.json.

Loss normalisation: a task returns the SUM of its loss over its units (target tokens by
default). All ranks know every batch of a step, so the loop divides by the step's global unit
count, and the gradient is exactly that of the mean over the whole global batch, however the
tokens fall across ranks and micro-batches.

Randomness (dropout): the torch RNG is re-seeded from (seed, step, position of the batch within
the step) before every micro-batch. The position does not depend on how the step's batches are
laid out over ranks and accumulation, so a resumed run draws the same numbers as an
uninterrupted one without saving RNG state, and 1 rank x 2 accumulation steps computes what
2 ranks x 1 do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from train.config import TrainStageConfig, save_config
from train.data.batching import TokenBudgetBatcher
from train.data.dataset import TokenizedSet, collate
from train.engine import checkpoint as ckpt
from train.engine import distributed as dist_
from train.engine import precision
from train.engine.ds_config import build_ds_config, effective_optim, zero_stage
from train.engine.flops import flops_per_token, peak_flops
from train.engine.loggers import ScalarLoggers
from train.engine.schedule import warmup_cosine
from train.engine.signals import EXIT_CHECKPOINTED, StopRequest
from train.errors import TdgError
from train.manifest import write_done
from train.progress import progress

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainTask:
    name: str
    model: torch.nn.Module  # parameters to train have requires_grad=True
    data: TokenizedSet  # or any set with lengths, len() and report() (the ranker's pairs)
    loss_fn: LossFn  # (module, batch) -> (sum of loss over units, {term name: sum over units})
    save_fn: Callable[..., dict]  # (module, out) on rank 0 with the trainable params gathered: write results
    pad_id: int
    units: Callable[[np.ndarray], int] | None = None  # normaliser of a batch; default: target tokens
    scalars_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None  # extra TensorBoard scalars
    collate_fn: Callable[[np.ndarray], dict] | None = None
    # held-out evaluation (every rank, eval mode, no grad) at each epoch end and after the last step;
    # its scalars go to TensorBoard and the last ones into DONE.json (all of them: eval_history). Samples a
    # TokenizedSet marks `heldout` (data.heldout_fraction) are left out of training and their loss added
    evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None
    # a full fine-tune: save_fn gets `state=` the whole weights in the training precision, consolidated on rank 0
    # one layer at a time (no fp32 masters gathered: they stay in the ZeRO checkpoints)
    full_weights: bool = False


@dataclass
class TrainResult:
    exit_code: int  # 0 finished, EXIT_CHECKPOINTED stopped by a signal after a checkpoint
    metrics: dict


def _target_tokens(data: TokenizedSet) -> Callable[[np.ndarray], int]:
    targets = data.lengths - data.prompt_lens
    return lambda idx: int(targets[idx].sum())


def _plan_total_steps(batcher: TokenBudgetBatcher, pos: ckpt.Position, epochs: int, world: int, accum: int,
                      max_steps: int) -> int:
    """Steps done plus the steps still ahead from `pos` on this world size (capped by max_steps)."""
    per_step = world * accum
    total = pos.global_step
    for epoch in range(pos.epoch, epochs):
        cursor = batcher.batch_index_at(epoch, pos.samples_in_epoch) if epoch == pos.epoch else 0
        total += (len(batcher.batches(epoch)) - cursor) // per_step
    return min(total, max_steps) if max_steps > 0 else total


def _done_line(name: str, metrics: dict, out: Path) -> str:
    """One line for the job log: where things ended, so nobody has to open DONE.json to see it."""
    line = f"[{name}] done: step {metrics['global_step']}, {metrics['seconds']:.0f} s"
    if not math.isnan(metrics["first_loss"]):
        line += f", loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f} (this run)"
    if "tokens_per_s_median" in metrics:
        line += f", {metrics['tokens_per_s_median']:,.0f} tokens/s"
    if "mfu_median" in metrics:
        line += f", MFU {100 * metrics['mfu_median']:.1f}%"
    return f"{line}; wrote {out}"


def _throughput(step_seconds: list[float], step_rates: list[float], flops_per_tok: float,
                world_peak_flops: float) -> dict[str, float]:
    """Medians over optimizer steps (the first, which warms up, left out when there are more), for DONE.json:
    step time, tokens/s of all ranks, MFU where the device peak is known, and this rank's peak GPU memory."""
    if not step_seconds:
        return {}
    rates = step_rates[1:] or step_rates
    out = {"step_seconds_median": float(np.median(step_seconds[1:] or step_seconds)),
           "tokens_per_s_median": float(np.median(rates))}
    if world_peak_flops > 0:
        out["mfu_median"] = float(np.median(rates)) * flops_per_tok / world_peak_flops
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def check_one_dtype(named: list[tuple[str, torch.nn.Parameter]], want: torch.dtype) -> None:
    """Every trainable parameter in the precision's dtype: DeepSpeed keeps fp32 masters of them, and ZeRO-3
    cannot flatten mixed dtypes. A stage that created one in another dtype is a bug, named here."""
    wrong = [(n, p.dtype) for n, p in named if p.dtype != want]
    if wrong:
        raise TypeError(f"trainable parameters must be {want} under this precision; {len(wrong)} are not, e.g. "
                        f"{wrong[0][0]} is {wrong[0][1]}")


def write_failure(path: Path, error: Exception) -> str:
    """A write that failed, with the free space where it was going (a full disk is the usual cause)."""
    import shutil

    where = path if path.exists() else path.parent
    try:
        free = f"; {shutil.disk_usage(where).free / 2**30:.4f} GiB free there"
    except OSError:
        free = ""
    return f"{path}: cannot write ({getattr(error, 'strerror', None) or error}){free}"


def _next_intact(candidates, root: Path, name: str) -> ckpt.Position | None:
    """The next checkpoint (newest first) whose recorded files every rank found intact. A damaged one is named in
    the log and set aside (COMPLETE.json renamed), so neither this run nor a later one picks it again."""
    for candidate in candidates:
        problems = [p for p in dist_.all_gather_object(
            ckpt.check_my_files(root / candidate.tag, dist_.rank(), dist_.world())) if p]
        if not problems:
            return candidate
        _set_aside(root, candidate, problems[0], name)
    return None


def _set_aside(root: Path, pos: ckpt.Position, problem: str, name: str) -> None:
    if dist_.is_main():
        print(f"[{name}] checkpoint {root / pos.tag} is unusable ({problem}); falling back to the next older "
              "complete checkpoint, if any", flush=True)
        complete = root / pos.tag / ckpt.COMPLETE
        complete.rename(complete.with_name(ckpt.COMPLETE + ".unusable"))
    dist_.barrier()


# what a changed input digest means, in the user's words
INPUT_NAMES = {"inputs.weights": "the weights at model.path (by content)",
               "inputs.prepared": "the prepared data at data.path (by content)"}


def _check_layout(root: Path, pos: ckpt.Position, layout: dict, ds_config: str) -> None:
    """A checkpoint saved under another ZeRO stage cannot load under this one. That is a setting to put back,
    not damage: stop and name it, and keep the checkpoint (a failed load would set it aside as unusable)."""
    saved = (ckpt.read_record(root / pos.tag) or {}).get("layout") or {}
    diffs = [f"{key} {saved[key]} when saved, {value} now" for key, value in layout.items()
             if key in saved and saved[key] != value]
    if diffs:
        raise TdgError(f"{root / pos.tag} was saved under another DeepSpeed layout ({'; '.join(diffs)}; "
                       f"engine.ds_config={ds_config}). Resume with the ds_config it was saved under; "
                       "the checkpoint is kept")


def _recipe_changes(root: Path, resume: ckpt.Position | None, recipe: dict, cfg, name: str) -> list[str]:
    """Refuse to resume under a changed training recipe (naming what changed) unless the config allows it."""
    if resume is None:
        return []
    saved = (ckpt.read_record(root / resume.tag) or {}).get("recipe") or {}
    # inputs are compared where both recorded them (an older version recorded others, by path)
    common = set(saved.get("inputs") or {}) & set(recipe.get("inputs") or {})
    changes = ckpt.recipe_changes({**saved, "inputs": {k: saved["inputs"][k] for k in common}},
                                  {**recipe, "inputs": {k: recipe["inputs"][k] for k in common}}) if saved else []
    changes = [INPUT_NAMES.get(c.split(":")[0], c.split(":")[0]) + ":" + c.split(":", 1)[1] for c in changes]
    if changes and not cfg.engine.resume_changed_config:
        raise TdgError(f"{root / resume.tag} was trained under another config: {'; '.join(changes)}. Resuming "
                       "would continue the old run under new settings; use a new engine.output_dir, or set "
                       "engine.resume_changed_config=true to continue anyway (DONE.json then records both)")
    if changes and dist_.is_main():
        print(f"[{name}] resuming under a changed config (engine.resume_changed_config): {'; '.join(changes)}",
              flush=True)
    return changes


def heldout_loss(task: TrainTask, module: torch.nn.Module, heldout: np.ndarray, lengths: np.ndarray, units,
                 collate_fn, cfg: TrainStageConfig, device: torch.device) -> dict[str, float]:
    """The task's own loss and terms (CE; CE and KD for distill), per unit, on the held-out samples, split over
    ranks. Every rank makes the same number of forward calls (ZeRO-3 gathers weights in each); the extra ones
    repeat batch 0 and are dropped."""
    batches = TokenBudgetBatcher(lengths, cfg.data.max_tokens, shuffle=False, packing=cfg.data.packing,
                                 group_size=int(heldout.sum()), index=np.flatnonzero(heldout)).batches(0)
    sums: dict[str, float] = {}
    for b, counted in dist_.equal_share(batches):
        batch = {key: v.to(device) for key, v in collate_fn(b).items()}
        loss_sum, terms = task.loss_fn(module, batch)
        if counted:
            for name, value in {"loss": loss_sum, **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
    total: dict[str, float] = {}
    for part in dist_.all_gather_object(sums):
        for name, value in part.items():
            total[name] = total.get(name, 0.0) + value
    n = max(1, sum(units(b) for b in batches))
    return {f"{task.name}/heldout_{name}": value / n for name, value in sorted(total.items())}


def _seed_for(seed: int, step: int, batch_in_step: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + batch_in_step) % (2**63 - 1)


def run_training(task: TrainTask, cfg: TrainStageConfig, device: torch.device, inputs: dict[str, str]) -> TrainResult:
    import deepspeed

    out = Path(cfg.engine.output_dir)
    world, rank = dist_.world(), dist_.rank()
    optim = effective_optim(cfg.optim, cfg.data.max_tokens, world)
    accum = optim.grad_accum
    root = out / "checkpoints"
    if dist_.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist_.barrier()

    lengths = task.data.lengths  # a property that walks every sample: read it once
    heldout = getattr(task.data, "heldout", None)  # TokenizedSet: samples of held-out questions (or None)
    heldout = heldout if heldout is not None and heldout.any() else None
    batcher = TokenBudgetBatcher(lengths, cfg.data.max_tokens, seed=cfg.data.seed,
                                 packing=cfg.data.packing, group_size=cfg.data.group_size,
                                 index=None if heldout is None else np.flatnonzero(~heldout))
    units = task.units or _target_tokens(task.data)
    collate_fn = task.collate_fn or (lambda idx: collate(task.data, idx, task.pad_id, cfg.data.packing,
                                                         cfg.data.mask_prompt))
    recipe = ckpt.recipe_of(asdict(cfg), inputs)
    candidates = iter(reversed(ckpt.complete_checkpoints(root)))
    resume = _next_intact(candidates, root, task.name)
    changed = _recipe_changes(root, resume, recipe, cfg, task.name)
    pos = resume or ckpt.Position(world_size=world)
    total_steps = _plan_total_steps(batcher, pos, cfg.optim.epochs, world, accum, cfg.optim.max_steps)
    if total_steps <= pos.global_step and resume is None:
        raise ValueError(f"{task.name}: no full optimizer step fits the data: {len(batcher.batches(0))} batches "
                         f"for {world} ranks x {accum} accumulation; lower data.max_tokens or optim.grad_accum")

    universal = resume is not None and resume.world_size != world
    prec = precision.resolve(cfg.engine.precision, dist_.on_cpu())
    ds_cfg = build_ds_config(cfg.engine.ds_config, optim, world, bf16=prec == "bf16", load_universal=universal)
    layout = {"zero_stage": zero_stage(ds_cfg)}
    if resume is not None:
        _check_layout(root, resume, layout, cfg.engine.ds_config)
    named_trainable = [(n, p) for n, p in task.model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    check_one_dtype(named_trainable, precision.DTYPES[prec])
    n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    schedule = lambda step: warmup_cosine(step, cfg.optim.warmup_steps, total_steps, cfg.optim.min_lr_ratio,  # noqa: E731
                                           cfg.optim.decay)
    client_opt = None
    if "optimizer" not in ds_cfg:
        client_opt = torch.optim.AdamW(trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                       weight_decay=cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=task.model, model_parameters=trainable, optimizer=client_opt, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    failures: list[str] = []
    while resume is not None:
        tag = resume.tag
        if universal:
            if dist_.is_main():
                tag = ckpt.to_universal(root, resume)
            tag = dist_.broadcast_object(tag)
        problem = None
        try:
            load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
            if load_path is None:
                problem = f"{root / tag}: DeepSpeed found nothing to load"
        except Exception as e:  # noqa: BLE001 -- whatever broke the load, an older checkpoint may still do
            problem = f"{root / tag}: loading failed: {type(e).__name__}: {e}"
        problems = [p for p in dist_.all_gather_object(problem) if p]
        if not problems:
            if dist_.is_main():
                how = f" (converted from {resume.world_size} to {world} ranks)" if universal else ""
                print(f"[{task.name}] resumed from {root / resume.tag} at step {resume.global_step}{how}", flush=True)
            break
        failures.append(problems[0])
        _set_aside(root, resume, problems[0], task.name)
        older = _next_intact(candidates, root, task.name)
        if older is None or (older.world_size != world) != universal:
            raise TdgError(f"{root}: no checkpoint could be loaded ({'; '.join(failures)}); the model may be "
                           "partly loaded, so this run stops instead of training from the start")
        changed = _recipe_changes(root, older, recipe, cfg, task.name)
        _check_layout(root, older, layout, cfg.engine.ds_config)
        resume = older
    pos = resume or ckpt.Position(world_size=world)

    log = ScalarLoggers(out, cfg.engine.report_to, f"{task.name} {out}", asdict(cfg), dist_.is_main())
    fpt = flops_per_token(engine.module, n_trainable, float(np.mean(lengths)))
    peak = peak_flops(cfg.engine.peak_tflops)
    bar = progress(total_steps, task.name, "step", initial=pos.global_step,
                   enabled=dist_.is_main() and cfg.engine.progress)

    saved_at = resume.global_step if resume is not None else -1

    def save_checkpoint() -> None:
        """Every rank saves and hashes its files; rank 0 records them in COMPLETE.json. A rank that cannot write
        (a full disk) makes every rank stop with its message, instead of leaving the others in a collective."""
        nonlocal saved_at
        if pos.global_step == saved_at:  # nothing trained since the last checkpoint
            return
        saved_at = pos.global_step
        pos.tag, pos.world_size = f"step{pos.global_step}", world
        problem, files = None, {}
        try:
            engine.save_checkpoint(str(root), tag=pos.tag, client_state={"tdg_position": asdict(pos)},
                                   exclude_frozen_parameters=True)
            files = ckpt.hash_my_files(root / pos.tag, rank, world)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError (iostream error)
            problem = write_failure(root / pos.tag, e)
            dist_.barrier()  # the one DeepSpeed's save ends with, which this rank did not reach
        dist_.raise_if_any(problem)
        every_file = {k: v for part in dist_.all_gather_object(files) for k, v in part.items()}
        if dist_.is_main():
            try:
                ckpt.mark_complete(root, pos, every_file, recipe, eval_history, layout)
                ckpt.prune(root, cfg.engine.keep_last)
            except OSError as e:
                problem = write_failure(root / pos.tag, e)
        dist_.raise_if_any(problem)

    last_eval: dict[str, float] = {}
    # every evaluation up to now, those of the runs before a resume included (kept in the checkpoint), for DONE.json
    eval_history: list[dict] = [] if resume is None else \
        (ckpt.read_record(root / resume.tag) or {}).get("eval_history", [])
    evaluated_at = -1

    def evaluate() -> None:
        nonlocal last_eval, evaluated_at
        if (task.evaluate_fn is None and heldout is None) or evaluated_at == pos.global_step:
            return
        engine.eval()
        with torch.no_grad():
            last_eval = task.evaluate_fn(engine.module) if task.evaluate_fn is not None else {}
            if heldout is not None:
                last_eval.update(heldout_loss(task, engine.module, heldout, lengths, units, collate_fn, cfg, device))
        engine.train()
        evaluated_at = pos.global_step
        eval_history.append({"step": pos.global_step, "epoch": pos.epoch,
                             **{k.rsplit("/", 1)[-1]: v for k, v in last_eval.items()}})
        log.scalars(last_eval, pos.global_step)
        if dist_.is_main():
            print(f"[{task.name}] step {pos.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()),
                  flush=True)

    per_step = world * accum
    losses: list[float] = []  # per optimizer step, for the start/end summary in DONE.json
    step_seconds: list[float] = []  # wall time of each optimizer step (benchmarks compare the median)
    step_rates: list[float] = []  # tokens/s of each optimizer step, all ranks together
    term_history = {"loss": losses}  # every loss term's per-step mean (DONE.json: first and final)
    t_start, tokens_seen = time.time(), 0
    exit_code = 0
    engine.train()
    with StopRequest() as stop:
        if dist_.any_rank(stop.requested, device):  # signalled while starting up: nothing new to save
            exit_code = EXIT_CHECKPOINTED
        while not exit_code and pos.epoch < cfg.optim.epochs and pos.global_step < total_steps:
            batches = batcher.batches(pos.epoch)
            cursor = batcher.batch_index_at(pos.epoch, pos.samples_in_epoch)
            while cursor + per_step <= len(batches) and pos.global_step < total_steps:
                t0 = time.time()
                step_batches = batches[cursor:cursor + per_step]
                global_units = max(1, sum(units(b) for b in step_batches))
                sums: dict[str, torch.Tensor] = {}
                for micro in range(accum):
                    index = micro * world + rank  # this batch's position within the step
                    torch.manual_seed(_seed_for(cfg.engine.seed, pos.global_step, index))
                    batch = {k: v.to(device) for k, v in collate_fn(step_batches[index]).items()}
                    loss_sum, terms = task.loss_fn(engine, batch)
                    engine.backward(loss_sum * (per_step / global_units))
                    engine.step()
                    for k, v in {"loss": loss_sum, **terms}.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                cursor += per_step
                pos.global_step += 1
                pos.samples_in_epoch = batcher.samples_before(pos.epoch, cursor)
                step_tokens = int(sum(lengths[b].sum() for b in step_batches))
                tokens_seen += step_tokens
                names = sorted(sums)
                reduced = torch.stack([sums[k] for k in names]).to(device)
                if torch.distributed.is_initialized():
                    torch.distributed.all_reduce(reduced)
                means = {k: float(v) / global_units for k, v in zip(names, reduced.tolist(), strict=True)}
                for k, v in means.items():  # "loss" goes to `losses`
                    term_history.setdefault(k, []).append(v)
                dt = max(time.time() - t0, 1e-9)
                step_seconds.append(dt)
                step_rates.append(step_tokens / dt)
                if pos.global_step % cfg.engine.log_every == 0:
                    grad_norm = engine.get_global_grad_norm()
                    scalars = {f"{task.name}/{k}": v for k, v in means.items()}
                    scalars.update({"train/lr": engine.get_lr()[0], "train/tokens_per_s": step_tokens / dt,
                                    "train/samples_per_s": sum(len(b) for b in step_batches) / dt,
                                    "train/epoch": pos.epoch})
                    if grad_norm is not None:
                        scalars["train/grad_norm"] = float(grad_norm)
                    if peak > 0:
                        scalars["train/mfu"] = fpt * step_tokens / dt / (peak * world)
                    if task.scalars_fn is not None:
                        scalars.update(task.scalars_fn(engine.module))
                    log.scalars(scalars, pos.global_step)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{engine.get_lr()[0]:.2e}")
                bar.update(1)
                if cfg.engine.save_every and pos.global_step % cfg.engine.save_every == 0:
                    save_checkpoint()
                if dist_.any_rank(stop.requested, device):
                    save_checkpoint()
                    exit_code = EXIT_CHECKPOINTED
                    break
            if exit_code:
                break
            if cursor + per_step > len(batches):  # this epoch's data is used up
                pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0
                evaluate()
    if not exit_code:
        evaluate()  # the last step did not end an epoch (max_steps), or nothing was left to train
    bar.close()
    log.close()
    if exit_code:
        if dist_.is_main():
            print(f"[{task.name}] stop requested: checkpointed at step {pos.global_step}; exit {exit_code} "
                  "(resubmit to continue)", flush=True)
        return TrainResult(exit_code, {"global_step": pos.global_step})

    save_checkpoint()
    window = max(1, min(5, len(losses) // 2))  # single steps are noisy: average a few
    metrics = {"global_step": pos.global_step,
               "first_loss": float(np.mean(losses[:window])) if losses else math.nan,
               "final_loss": float(np.mean(losses[-window:])) if losses else math.nan,
               "tokens": tokens_seen, "seconds": round(time.time() - t_start, 2), "world_size": world,
               "grad_accum": accum, "precision": prec, "trainable_params": n_trainable, "data": task.data.report(),
               **({"changed_on_resume": changed} if changed else {}),
               **_throughput(step_seconds, step_rates, fpt, peak * world),
               **{k.rsplit("/", 1)[-1]: v for k, v in last_eval.items()},
               **({"eval_history": eval_history} if eval_history else {}),
               "terms": {k: {"first": float(np.mean(v[:window])), "final": float(np.mean(v[-window:]))}
                         for k, v in term_history.items() if k != "loss"}}
    if task.full_weights:
        state = precision.consolidated_weights(engine)  # every rank: a collective; the whole state on rank 0 only
        if dist_.is_main():
            metrics.update(task.save_fn(engine.module, out, state=state) or {})
    else:
        masters = precision.fp32_masters(named_trainable)  # every rank: assembling them is a collective
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if dist_.is_main():
                with precision.master_weights(named_trainable, masters):  # saves write the fp32 masters
                    metrics.update(task.save_fn(engine.module, out) or {})
    dist_.barrier()
    if dist_.is_main():
        write_done(out, config=asdict(cfg), inputs=inputs, metrics=metrics, stage=task.name)
        print(_done_line(task.name, metrics, out), flush=True)
    dist_.barrier()
    return TrainResult(0, metrics)
