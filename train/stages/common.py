"""What every training stage does around the engine: skip when done, set up, load data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.config import TrainStageConfig
from train.data.dataset import IGNORE, TokenizedSet, collate, read_prepared, tokenize_with
from train.data.tokenizer import load_tokenizer
from train.engine import distributed as dist_
from train.engine import output_lock, precision
from train.engine.ds_config import build_ds_config, effective_optim
from train.engine.loggers import check_available
from train.engine.loop import TrainTask, run_training
from train.errors import ConfigError, InputError
from train.manifest import dir_digest, file_digest, read_done
from train.models.hub import resolve_model_ref
from train.models.loading import check_model_dir, tokenizer_dir


def load_stage_data(name: str, cfg: TrainStageConfig, labels: tuple[str, ...]) -> tuple[TokenizedSet, object]:
    tok = load_tokenizer(tokenizer_dir(cfg.model), cfg.model.trust_remote_code)
    table = read_prepared(cfg.data.path, labels=labels)
    if table.num_rows == 0:
        raise InputError(cfg.data.path, None, f"no {'/'.join(labels)} rationales in the prepared data", "empty_input")
    data = tokenize_with(table, tok, cfg.data)
    if len(data) == 0:
        raise InputError(cfg.data.path, None, f"no sample fits data.max_len={cfg.data.max_len}: {data.describe()}",
                         "empty_input")
    if dist_.is_main():
        print(f"[{name}] {'/'.join(labels)}: {data.describe()}", flush=True)
    if cfg.data.heldout_fraction > 0:
        data.heldout = heldout_mask(name, table, data, cfg.data.heldout_fraction, cfg.data.seed)
    return data, tok


def heldout_mask(name: str, table, data: TokenizedSet, fraction: float, seed: int) -> np.ndarray:
    """Which samples belong to held-out questions (the ranker's hashed split: a question is all in or all out)."""
    from train.data.pairs import is_heldout

    qid_of = dict(zip(table.column("id").to_pylist(), table.column("qid").to_pylist(), strict=True))
    mask = np.array([is_heldout(qid_of[i], fraction, seed) for i in data.ids], dtype=bool)
    if mask.all():
        raise ConfigError(f"data.heldout_fraction={fraction} holds out every question: nothing left to train on")
    if dist_.is_main():
        qids = {qid_of[i] for i, h in zip(data.ids, mask, strict=True) if h}
        print(f"[{name}] held out: {int(mask.sum())} samples of {len(qids)} questions (data.heldout_fraction="
              f"{fraction}); their loss is evaluated at each epoch end" if mask.any() else
              f"[{name}] data.heldout_fraction={fraction} selects no question of this data: no held-out loss",
              flush=True)
    return mask


def open_output(name: str, cfg, out: Path) -> torch.device:
    """For the stages that are not a training loop (eval, sample): set up distributed, hold the output dir, and
    write the resolved config.yaml (rank 0) before any rank goes on."""
    from train.config import save_config

    device = dist_.setup(cfg.engine.dist_timeout_minutes)
    output_lock.hold(out, name)
    if dist_.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist_.barrier()
    return device


def model_dtype(cfg: TrainStageConfig) -> torch.dtype:
    """The dtype every parameter of a training stage's model has (train.engine.precision)."""
    return precision.dtype(cfg.engine.precision, dist_.on_cpu())


def causal_lm_loss(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of next-token cross-entropy over the target tokens (labels != IGNORE)."""
    lp, _ = token_logprobs(module, batch)
    return -lp.sum(), {}


def token_logprobs(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L-1] fp32 log p of each next token, 0 off target; [B, L-1] bool target mask), through the fused
    cross-entropy so no [B, L, V] log-softmax is kept."""
    logits = module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    lp = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return lp.view(labels.shape), labels != IGNORE


def sequence_logprobs(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] sum of log p over each row's target tokens, [B] how many target tokens each row has)."""
    lp, mask = token_logprobs(module, batch)
    return lp.sum(-1), mask.sum(-1)


def load_pair_data(name: str, cfg: TrainStageConfig, cap: int, seed: int):
    """(PairSet, tokenizer, stats) for a stage that trains on (positive, negative) pairs of a question (dpo,
    redi's pair unit), with the stage's line saying what it kept and what it skipped."""
    from train.data.pairs import pairs_from_prepared

    tok = load_tokenizer(tokenizer_dir(cfg.model), cfg.model.trust_remote_code)
    pairs, _, stats = pairs_from_prepared(cfg.data, tok, 0.0, cap, seed)
    if dist_.is_main():
        print(f"[{name}] pos/neg: {pairs.seqs.describe()}; {stats['train_pairs']} pairs; skipped "
              f"{stats['only_pos']} questions with only positives, {stats['only_neg']} with only negatives",
              flush=True)
    return pairs, tok, stats


def is_negative(cfg: TrainStageConfig, data: TokenizedSet) -> np.ndarray:
    """[len(data)] bool: which samples are negative rationales (from the prepared data's labels)."""
    table = read_prepared(cfg.data.path, columns=["id", "label"])
    label_of = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True))
    return np.array([label_of[i] == "neg" for i in data.ids])


def collate_with_values(data: TokenizedSet, values: np.ndarray, key: str, pad_id: int, packing: bool,
                        mask_prompt: bool = True):
    """A collate function: the usual batch plus `key`, each sample's `values[i]` at every one of its positions
    (same layout as labels), for losses that treat samples differently (negatives, per-sample weights)."""
    def collate_fn(indices) -> dict:
        batch = collate(data, indices, pad_id, packing, mask_prompt)
        if packing:
            per_token = np.concatenate([np.full(len(data.input_ids[i]), values[i]) for i in indices])[None]
        else:
            per_token = np.repeat(values[indices][:, None], batch["labels"].shape[1], axis=1)
        batch[key] = torch.from_numpy(per_token)
        return batch

    return collate_fn


def already_done(name: str, out: Path) -> bool:
    """True if `out` has DONE.json (said once, by the launcher's rank 0: no process group exists yet)."""
    if read_done(out) is None:
        return False
    if dist_.launch_rank() == 0:
        print(f"[{name}] {out} already has DONE.json: nothing to do", flush=True)
    return True


def run_stage(name: str, cfg: TrainStageConfig, build: Callable[[TrainStageConfig, dict], TrainTask],
              extra_inputs: dict[str, str] | None = None) -> int:
    """Skip if DONE.json exists; otherwise set up distributed, build the task, train. Returns exit code."""
    out = Path(cfg.engine.output_dir)
    if already_done(name, out):
        return 0
    # hub ids become their cached snapshot dirs here, so config.yaml records the exact revision trained on
    cfg.model.path = resolve_model_ref(cfg.model.path, "model.path")
    cfg.model.tokenizer = resolve_model_ref(cfg.model.tokenizer, "model.tokenizer")
    check_model_dir(cfg.model.path)  # before any tokenizer or model load: a named error, not a hub traceback
    if cfg.model.tokenizer and not Path(cfg.model.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer: {cfg.model.tokenizer} is not a directory (a tokenizer dir or hub id)")
    check_available(cfg.engine.report_to)
    device = dist_.setup(cfg.engine.dist_timeout_minutes)
    output_lock.hold(out, name)
    optim = effective_optim(cfg.optim, cfg.data.max_tokens, dist_.world())
    if cfg.optim.global_batch_tokens and dist_.is_main():
        print(f"[{name}] global batch {cfg.optim.global_batch_tokens:,} tokens = {dist_.world()} rank(s) x "
              f"{optim.grad_accum} micro-batch(es) x data.max_tokens {cfg.data.max_tokens:,}", flush=True)
    bf16 = precision.resolve(cfg.engine.precision, dist_.on_cpu()) == "bf16"
    ds_cfg = build_ds_config(cfg.engine.ds_config, optim, dist_.world(), bf16=bf16)
    # Weights a model creates while loading (the ranker's new scalar head) come from the torch RNG, which
    # torch seeds from entropy in every new process: seed it so every run and every rank builds the same
    torch.manual_seed(cfg.engine.seed)
    task = build(cfg, ds_cfg)
    inputs = {"data": dir_digest(cfg.data.path), "model_config": file_digest(Path(cfg.model.path) / "config.json"),
              **(extra_inputs or {})}
    return run_training(task, cfg, device, inputs).exit_code
