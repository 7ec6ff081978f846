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
from train.engine.memory import peak_memory
from train.engine.resume import check_layout, load_with_fallback, next_intact, recipe_changes
from train.engine.schedule import warmup_cosine
from train.engine.signals import EXIT_CHECKPOINTED, StopRequest
from train.engine.streamed_save import save_model_streamed
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
    return {**out, **peak_memory()}


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
    """Train `task` under `cfg` from its latest intact checkpoint (if any) to the end or a stop signal; then the
    final checkpoint, the result and DONE.json. Each part is a Trainer method, in the order it runs here."""
    trainer = Trainer(task, cfg, device, inputs)
    trainer.resume()
    exit_code = trainer.train()
    trainer.close()
    if exit_code:
        if dist_.is_main():
            print(f"[{task.name}] stop requested: checkpointed at step {trainer.pos.global_step}; exit {exit_code} "
                  "(resubmit to continue)", flush=True)
        dist_.barrier()  # leave together: torchrun ends the other ranks as soon as one exits non-zero
        return TrainResult(exit_code, {"global_step": trainer.pos.global_step})
    trainer.save_checkpoint()
    metrics = trainer.metrics()
    trainer.save_result(metrics)
    return TrainResult(0, metrics)


class Trainer:
    """One training run's state, shared by its parts: resume, the step, periodic checkpoints, evaluation and
    its history, the final save. A contributor changes one part at a time; run_training says the order."""

    def __init__(self, task: TrainTask, cfg: TrainStageConfig, device: torch.device, inputs: dict[str, str]):
        self.task, self.cfg, self.device, self.inputs = task, cfg, device, inputs
        self.out = Path(cfg.engine.output_dir)
        self.root = self.out / "checkpoints"
        self.world, self.rank = dist_.world(), dist_.rank()
        self.optim = effective_optim(cfg.optim, cfg.data.max_tokens, self.world)
        self.accum = self.optim.grad_accum
        if dist_.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        dist_.barrier()
        self.lengths = task.data.lengths  # a property that walks every sample: read it once
        heldout = getattr(task.data, "heldout", None)  # TokenizedSet: samples of held-out questions (or None)
        self.heldout = heldout if heldout is not None and heldout.any() else None
        self.batcher = TokenBudgetBatcher(self.lengths, cfg.data.max_tokens, seed=cfg.data.seed,
                                          packing=cfg.data.packing, group_size=cfg.data.group_size,
                                          index=None if self.heldout is None else np.flatnonzero(~self.heldout))
        self.units = task.units or _target_tokens(task.data)
        self.collate_fn = task.collate_fn or (lambda idx: collate(task.data, idx, task.pad_id, cfg.data.packing,
                                                                  cfg.data.mask_prompt))
        self.recipe = ckpt.recipe_of(asdict(cfg), inputs)
        self.losses: list[float] = []  # per optimizer step, for the start/end summary in DONE.json
        self.step_seconds: list[float] = []  # wall time of each optimizer step (benchmarks compare the median)
        self.step_rates: list[float] = []  # tokens/s of each optimizer step, all ranks together
        self.term_history: dict[str, list[float]] = {"loss": self.losses}  # every loss term's per-step mean
        self.tokens_seen = 0
        self.last_eval: dict[str, float] = {}
        self.evaluated_at = -1

    # --- resume: find, verify, build the engine, load, fall back ------------------------------------------------

    def resume(self) -> None:
        cfg, name = self.cfg, self.task.name
        candidates = iter(reversed(ckpt.complete_checkpoints(self.root)))
        found = next_intact(candidates, self.root, name)
        self.changed = recipe_changes(self.root, found, self.recipe, cfg, name)
        pos = found or ckpt.Position(world_size=self.world)
        self.total_steps = _plan_total_steps(self.batcher, pos, cfg.optim.epochs, self.world, self.accum,
                                             cfg.optim.max_steps)
        if self.total_steps <= pos.global_step and found is None:
            raise ValueError(f"{name}: no full optimizer step fits the data: {len(self.batcher.batches(0))} batches "
                             f"for {self.world} ranks x {self.accum} accumulation; lower data.max_tokens or "
                             "optim.grad_accum")
        universal = found is not None and found.world_size != self.world
        self._build_engine(found, universal)
        if found is not None:
            found, self.changed = load_with_fallback(self.engine, self.root, found, self.changed, candidates,
                                                     self.world, universal, self.recipe, cfg, self.layout, name)
        self.pos = found or ckpt.Position(world_size=self.world)
        self.saved_at = found.global_step if found is not None else -1
        # every evaluation up to now, those of the runs before a resume included (kept in the checkpoint)
        self.eval_history: list[dict] = [] if found is None else \
            (ckpt.read_record(self.root / found.tag) or {}).get("eval_history", [])
        self.log = ScalarLoggers(self.out, cfg.engine.report_to, f"{name} {self.out}", asdict(cfg), dist_.is_main())
        self.fpt = flops_per_token(self.engine.module, self.n_trainable, float(np.mean(self.lengths)))
        self.peak = peak_flops(cfg.engine.peak_tflops)
        self.bar = progress(self.total_steps, name, "step", initial=self.pos.global_step,
                            enabled=dist_.is_main() and cfg.engine.progress)

    def _build_engine(self, found: ckpt.Position | None, universal: bool) -> None:
        import deepspeed

        cfg = self.cfg
        self.prec = precision.resolve(cfg.engine.precision, dist_.on_cpu())
        ds_cfg = build_ds_config(cfg.engine.ds_config, self.optim, self.world, bf16=self.prec == "bf16",
                                 load_universal=universal)
        self.layout = {"zero_stage": zero_stage(ds_cfg)}
        if found is not None:
            check_layout(self.root, found, self.layout, cfg.engine.ds_config)
        self.named_trainable = [(n, p) for n, p in self.task.model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in self.named_trainable]
        check_one_dtype(self.named_trainable, precision.DTYPES[self.prec])
        self.n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.trainable)
        total = self.total_steps
        schedule = lambda step: warmup_cosine(step, cfg.optim.warmup_steps, total, cfg.optim.min_lr_ratio,  # noqa: E731
                                               cfg.optim.decay)
        client_opt = None
        if "optimizer" not in ds_cfg:
            client_opt = torch.optim.AdamW(self.trainable, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.task.model, model_parameters=self.trainable, optimizer=client_opt, config=ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )

    # --- the loop and the step ------------------------------------------------------------------------------------

    def train(self) -> int:
        """Optimizer steps to the end of the data or max_steps; 0, or EXIT_CHECKPOINTED after a stop signal."""
        cfg, pos, per_step = self.cfg, self.pos, self.world * self.accum
        self.t_start = time.time()
        self.engine.train()
        with StopRequest() as stop:
            if dist_.any_rank(stop.requested, self.device):  # signalled while starting up: nothing new to save
                return EXIT_CHECKPOINTED
            while pos.epoch < cfg.optim.epochs and pos.global_step < self.total_steps:
                batches = self.batcher.batches(pos.epoch)
                cursor = self.batcher.batch_index_at(pos.epoch, pos.samples_in_epoch)
                while cursor + per_step <= len(batches) and pos.global_step < self.total_steps:
                    self.step(batches[cursor:cursor + per_step])
                    cursor += per_step
                    pos.samples_in_epoch = self.batcher.samples_before(pos.epoch, cursor)
                    if cfg.engine.save_every and pos.global_step % cfg.engine.save_every == 0:
                        self.save_checkpoint()
                    if dist_.any_rank(stop.requested, self.device):
                        self.save_checkpoint()
                        return EXIT_CHECKPOINTED
                if cursor + per_step > len(batches):  # this epoch's data is used up
                    pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0
                    self.evaluate()
        self.evaluate()  # the last step did not end an epoch (max_steps), or nothing was left to train
        return 0

    def step(self, step_batches: list[np.ndarray]) -> None:
        """One optimizer step over the global batch `step_batches` (this rank's share of them): forward, backward
        and DeepSpeed's step per micro-batch; then the step's mean loss terms, logged."""
        t0, pos, engine = time.time(), self.pos, self.engine
        per_step = self.world * self.accum
        global_units = max(1, sum(self.units(b) for b in step_batches))
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accum):
            index = micro * self.world + self.rank  # this batch's position within the step
            torch.manual_seed(_seed_for(self.cfg.engine.seed, pos.global_step, index))
            batch = {k: v.to(self.device) for k, v in self.collate_fn(step_batches[index]).items()}
            loss_sum, terms = self.task.loss_fn(engine, batch)
            engine.backward(loss_sum * (per_step / global_units))
            engine.step()
            for k, v in {"loss": loss_sum, **terms}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        pos.global_step += 1
        step_tokens = int(sum(self.lengths[b].sum() for b in step_batches))
        self.tokens_seen += step_tokens
        names = sorted(sums)
        reduced = torch.stack([sums[k] for k in names]).to(self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(reduced)
        means = {k: float(v) / global_units for k, v in zip(names, reduced.tolist(), strict=True)}
        for k, v in means.items():  # "loss" goes to `losses`
            self.term_history.setdefault(k, []).append(v)
        dt = max(time.time() - t0, 1e-9)
        self.step_seconds.append(dt)
        self.step_rates.append(step_tokens / dt)
        if pos.global_step % self.cfg.engine.log_every == 0:
            self._log_step(means, step_batches, step_tokens, dt)
        self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", lr=f"{engine.get_lr()[0]:.2e}")
        self.bar.update(1)

    def _log_step(self, means: dict[str, float], step_batches: list[np.ndarray], step_tokens: int, dt: float) -> None:
        engine = self.engine
        grad_norm = engine.get_global_grad_norm()
        scalars = {f"{self.task.name}/{k}": v for k, v in means.items()}
        scalars.update({"train/lr": engine.get_lr()[0], "train/tokens_per_s": step_tokens / dt,
                        "train/samples_per_s": sum(len(b) for b in step_batches) / dt, "train/epoch": self.pos.epoch})
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        if self.peak > 0:
            scalars["train/mfu"] = self.fpt * step_tokens / dt / (self.peak * self.world)
        if self.task.scalars_fn is not None:
            scalars.update(self.task.scalars_fn(engine.module))
        self.log.scalars(scalars, self.pos.global_step)

    # --- periodic checkpoint ----------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Every rank saves and hashes its files; rank 0 records them in COMPLETE.json. A rank that cannot write
        (a full disk) makes every rank stop with its message, instead of leaving the others in a collective."""
        pos, root = self.pos, self.root
        if pos.global_step == self.saved_at:  # nothing trained since the last checkpoint
            return
        self.saved_at = pos.global_step
        pos.tag, pos.world_size = f"step{pos.global_step}", self.world
        problem, files = None, {}
        try:
            self.engine.save_checkpoint(str(root), tag=pos.tag, client_state={"tdg_position": asdict(pos)},
                                        exclude_frozen_parameters=True)
            files = ckpt.hash_my_files(root / pos.tag, self.rank, self.world)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError (iostream error)
            problem = write_failure(root / pos.tag, e)
            dist_.barrier()  # the one DeepSpeed's save ends with, which this rank did not reach
        dist_.raise_if_any(problem)
        every_file = {k: v for part in dist_.all_gather_object(files) for k, v in part.items()}
        if dist_.is_main():
            try:
                ckpt.mark_complete(root, pos, every_file, self.recipe, self.eval_history, self.layout)
                ckpt.prune(root, self.cfg.engine.keep_last)
            except OSError as e:
                problem = write_failure(root / pos.tag, e)
        dist_.raise_if_any(problem)

    # --- evaluation and its history ---------------------------------------------------------------------------------

    def evaluate(self) -> None:
        task, pos, engine = self.task, self.pos, self.engine
        if (task.evaluate_fn is None and self.heldout is None) or self.evaluated_at == pos.global_step:
            return
        engine.eval()
        with torch.no_grad():
            self.last_eval = task.evaluate_fn(engine.module) if task.evaluate_fn is not None else {}
            if self.heldout is not None:
                self.last_eval.update(heldout_loss(task, engine.module, self.heldout, self.lengths, self.units,
                                                   self.collate_fn, self.cfg, self.device))
        engine.train()
        self.evaluated_at = pos.global_step
        self.eval_history.append({"step": pos.global_step, "epoch": pos.epoch,
                                  **{k.rsplit("/", 1)[-1]: v for k, v in self.last_eval.items()}})
        self.log.scalars(self.last_eval, pos.global_step)
        if dist_.is_main():
            print(f"[{task.name}] step {pos.global_step}: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()), flush=True)

    # --- the final save ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.bar.close()
        self.log.close()

    def metrics(self) -> dict:
        """DONE.json's metrics: losses at the start and the end, throughput, evaluations, the recipe's changes."""
        losses, term_history = self.losses, self.term_history
        window = max(1, min(5, len(losses) // 2))  # single steps are noisy: average a few
        return {"global_step": self.pos.global_step,
                "first_loss": float(np.mean(losses[:window])) if losses else math.nan,
                "final_loss": float(np.mean(losses[-window:])) if losses else math.nan,
                "tokens": self.tokens_seen, "seconds": round(time.time() - self.t_start, 2), "world_size": self.world,
                "grad_accum": self.accum, "precision": self.prec, "trainable_params": self.n_trainable,
                "data": self.task.data.report(),
                **({"changed_on_resume": self.changed} if self.changed else {}),
                **_throughput(self.step_seconds, self.step_rates, self.fpt, self.peak * self.world),
                **{k.rsplit("/", 1)[-1]: v for k, v in self.last_eval.items()},
                **({"eval_history": self.eval_history} if self.eval_history else {}),
                "terms": {k: {"first": float(np.mean(v[:window])), "final": float(np.mean(v[-window:]))}
                          for k, v in term_history.items() if k != "loss"}}

    def save_result(self, metrics: dict) -> None:
        """The trained weights (a full model in the training precision, or the trainable parameters in fp32), then
        DONE.json."""
        import deepspeed

        task, out = self.task, self.out
        if task.full_weights:  # every rank: one gather per parameter; rank 0 writes a shard at a time
            metrics.update(save_model_streamed(self.engine.module, out / "model"))
            if dist_.is_main():
                metrics.update(task.save_fn(self.engine.module, out) or {})
        else:
            masters = precision.fp32_masters(self.named_trainable)  # every rank: assembling them is a collective
            with deepspeed.zero.GatheredParameters(self.trainable, modifier_rank=None):
                if dist_.is_main():
                    with precision.master_weights(self.named_trainable, masters):  # saves write the fp32 masters
                        metrics.update(task.save_fn(self.engine.module, out) or {})
        dist_.barrier()
        if dist_.is_main():
            write_done(out, config=asdict(self.cfg), inputs=self.inputs, metrics=metrics, stage=task.name)
            print(_done_line(task.name, metrics, out), flush=True)
        dist_.barrier()
