"""What every training stage does around the engine: skip when done, set up, load data."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from train.config import TrainStageConfig
from train.data.dataset import IGNORE, TokenizedSet, collate, read_prepared, tokenize_with
from train.data.tokenizer import load_tokenizer
from train.engine import distributed as dist_
from train.engine import output_lock, precision
from train.engine.ds_config import build_ds_config, effective_optim
from train.engine.loggers import check_available
from train.engine.loop import TrainTask, run_training
from train.errors import ConfigError, InputError
from train.manifest import finished_config_changes, prepared_digest, read_done, weights_fingerprint
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

    device = dist_.setup(cfg.engine.dist_timeout_minutes, use_deepspeed=False)  # nothing trains here
    output_lock.hold(out, name)
    if dist_.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    dist_.barrier()
    return device


def model_dtype(cfg: TrainStageConfig) -> torch.dtype:
    """The dtype every parameter of a training stage's model has (train.engine.precision)."""
    return precision.dtype(cfg.engine.precision, dist_.on_cpu())


def causal_lm_loss(module: torch.nn.Module, batch: dict, chunk: int = 0) -> tuple[torch.Tensor, dict]:
    """Sum of next-token cross-entropy over the target tokens (labels != IGNORE)."""
    lp, _ = token_logprobs(module, batch, chunk)
    return -lp.sum(), {}


def token_logprobs(module: torch.nn.Module, batch: dict, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L-1] fp32 log p of each next token, 0 off target; [B, L-1] bool target mask).

    The LM head runs at target positions only (`target_hidden`). With `chunk` > 0 (model.loss_chunk_tokens)
    the head and the loss run over that many positions at a time and are recomputed in backward, so the
    [targets, vocab] fp32 logits never exist at once."""
    hidden, labels, mask, head = target_hidden(module, batch)
    lp = target_logprobs(hidden, labels, head, chunk)
    return torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp), mask


def target_hidden(module: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.nn.Module]:
    """([N, H] the LM head's input at the N target positions, row-major; [N] their next tokens; [B, L-1] bool
    target mask; the LM head).

    Prompt and pad positions (about 38% of the tokens of the MATH rationales) get no vocabulary-wide logits.
    The model's own forward computes logits at one position (`logits_to_keep=1`, so ZeRO-3's hooks see the
    usual forward) and returns the last hidden state, which the caller sends through the head."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    out = module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden, head = out.hidden_states[-1], module.get_output_embeddings()
    _check_head_input(module, head, hidden[:, -1], out.logits[:, -1])
    return hidden[:, :-1][mask], labels[mask], mask, head


_CHECKED_HEADS: weakref.WeakSet = weakref.WeakSet()  # heads already checked (a new model is checked again)


def _check_head_input(module: torch.nn.Module, head: torch.nn.Module, last_hidden: torch.Tensor,
                      last_logits: torch.Tensor) -> None:
    """Once per model: the LM head applied to the last hidden state must give the model's own logits. An
    architecture that scales or caps its logits after the head (Gemma 2, Cohere) would otherwise train on
    wrong log-probs without a sign."""
    if head in _CHECKED_HEADS:
        return
    with torch.no_grad():
        ours = head(last_hidden).float()
    if not torch.allclose(ours, last_logits.float(), rtol=1e-3, atol=1e-3):
        name = type(getattr(module, "module", module)).__name__
        raise ConfigError(f"model: {name}'s logits are not its LM head applied to its last hidden state (logit "
                          "scaling or soft-capping); this trainer supports Llama-family heads")
    _CHECKED_HEADS.add(head)


def target_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int = 0) -> torch.Tensor:
    """[N] fp32 log p(target) from [N, H] hidden states through `head`, in chunks (`head_chunks`)."""
    return head_chunks(hidden, head, chunk, lambda logits, y: (-F.cross_entropy(logits, y, reduction="none"),),
                       targets)[0]


def head_chunks(hidden: torch.Tensor, head: torch.nn.Module, chunk: int,
                fn: Callable[..., tuple[torch.Tensor, ...]], *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`fn(fp32 logits [n, V], *rows[i:i+n])` -> per-position [n] tensors, over [N, H] `hidden` sent through
    `head` `chunk` rows at a time when `chunk` > 0, each chunk recomputed in backward instead of kept: one
    chunk's [chunk, V] logits (and whatever `fn` derives from them) at a time. Concatenated over chunks."""
    def piece(h: torch.Tensor, *r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return fn(head(h).float(), *r)

    if chunk <= 0 or hidden.shape[0] <= chunk:
        return piece(hidden, *rows)
    parts = zip(hidden.split(chunk), *(r.split(chunk) for r in rows), strict=True)
    if torch.is_grad_enabled():
        outs = [torch.utils.checkpoint.checkpoint(piece, *p, use_reentrant=False) for p in parts]
    else:
        outs = [piece(*p) for p in parts]
    return tuple(torch.cat(o) for o in zip(*outs, strict=True))


def sequence_logprobs(module: torch.nn.Module, batch: dict, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] sum of log p over each row's target tokens, [B] how many target tokens each row has)."""
    lp, mask = token_logprobs(module, batch, chunk)
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


def already_done(name: str, out: Path, config: dict | None = None) -> bool:
    """True if `out` has this stage's DONE.json, written under `config` (said once, by the launcher's rank 0: no
    process group exists yet). Another stage's DONE.json, or one written under another config (other than in
    HOW_NOT_WHAT keys), is an error naming what differs: `nat` pointed at a finished `neg` dir, or an eval of
    another model into a finished eval dir, would otherwise exit 0 with the old results."""
    done = read_done(out)
    if done is None:
        return False
    if done.get("stage", name) != name:
        raise ConfigError(f"engine.output_dir: {out} was finished by stage {done['stage']}, not {name} "
                          f"({out / 'DONE.json'}); give stage {name} its own output dir")
    changes = finished_config_changes(done.get("config") or {}, config) if config is not None else []
    if changes:
        raise ConfigError(f"engine.output_dir: {out} was finished under another config ({'; '.join(changes)}), so its "
                          f"results are not this config's; give this run its own engine.output_dir, or delete {out} "
                          "to run it again")
    if dist_.launch_rank() == 0:
        print(f"[{name}] {out} already has DONE.json: nothing to do", flush=True)
    return True


def run_stage(name: str, cfg: TrainStageConfig, build: Callable[[TrainStageConfig, dict], TrainTask],
              extra_inputs: dict[str, str] | None = None) -> int:
    """Skip if DONE.json exists; otherwise set up distributed, build the task, train. Returns exit code."""
    out = Path(cfg.engine.output_dir)
    if already_done(name, out, asdict(cfg)):
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
    if cfg.model.loss_chunk_tokens and ds_cfg.get("zero_optimization", {}).get("stage") == 3:
        raise ConfigError("model.loss_chunk_tokens: chunks need ZeRO-0, 1 or 2 (engine.ds_config): under ZeRO-3 "
                          "each chunk gathers the partitioned LM head, and ranks with different numbers of target "
                          "tokens would gather different numbers of times; set it to 0 (the head still runs at "
                          "target positions only)")
    # Weights a model creates while loading (the ranker's new scalar head) come from the torch RNG, which
    # torch seeds from entropy in every new process: seed it so every run and every rank builds the same
    torch.manual_seed(cfg.engine.seed)
    task = build(cfg, ds_cfg)
    # by content, not path: a moved run resumes, changed weights or edited data do not
    inputs = {"prepared": prepared_digest(cfg.data.path), "weights": weights_fingerprint(cfg.model.path),
              **(extra_inputs or {})}
    return run_training(task, cfg, device, inputs).exit_code
