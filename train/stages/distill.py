"""Stage `distill`: NCE distillation of the NAT teacher into a student, on POSITIVE rationales.

    loss = (1 - lam) * CE + lam * (0.5 + beta_i) * KD_i,   KD = KL(p_teacher || p_student) per token

Offline (default): beta_i and the teacher's top-k log-probs come from stage `score`; no teacher
is in memory. KD over a top-k is computed on k + 1 bins, the teacher's k tokens and "everything
else" (the stored tail mass against the student's mass outside those k tokens):
    KD = sum_{j in top-k} p_T(j) (log p_T(j) - log p_S(j)) + p_T(tail) (log p_T(tail) - log p_S(tail))
This is the exact KL between the two distributions coarsened to those bins; with k = vocabulary
size the tail is empty and it is the exact full KL. With temperature T != 1 both sides are
divided by T and renormalised over the k + 1 bins (exact only at T = 1) and KD is scaled by T^2.

Online: the teacher runs in every step (both modes, as the reference did), beta is computed on
the fly; it exists to compare speed and to check that both modes give the same loss.

The student must share the teacher's tokenizer (checked at start). Output as for `sft`: a LoRA
`adapter/` or, with `distill.full`, a `model/` dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train.config import DistillConfig
from train.data.dataset import TokenizedSet, collate
from train.data.mmap_tensors import mmap_safetensors, to_torch
from train.data.prompt import Prompt, check_same_prompt
from train.engine.loop import TrainTask
from train.errors import ConfigError, InputError, TdgError
from train.manifest import check_stage_output, dir_digest, file_digest
from train.models.nat import NAT_JSON
from train.stages.common import head_chunks, load_stage_data, run_stage, target_hidden
from train.stages.sft import full_model, lora_model


def check_same_vocabulary(student_tok, teacher_tok_dir: str) -> None:
    from train.data.tokenizer import load_tokenizer

    teacher = load_tokenizer(teacher_tok_dir).get_vocab()
    student = student_tok.get_vocab()
    if teacher != student:
        diff = sorted(set(teacher.items()) ^ set(student.items()))[:3]
        raise ConfigError(f"model.tokenizer: the student's vocabulary ({len(student)} tokens) differs from the "
                          f"teacher's at {teacher_tok_dir} ({len(teacher)} tokens), e.g. {diff}; KD needs the "
                          "same token ids on both sides")


def sparse_kd(student_logits: torch.Tensor, ids: torch.Tensor, t_lp: torch.Tensor, t_tail: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position over the teacher's top-k plus one tail bin. [N, V] -> [N]."""
    s_lp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s_top = s_lp.gather(-1, ids)
    s_tail = torch.log1p(-torch.logsumexp(s_top, -1).exp().clamp(max=1.0 - 1e-7))
    t_bins = torch.cat([t_lp.float(), t_tail.float()[:, None]], -1)
    if temperature != 1.0:
        t_bins = F.log_softmax(t_bins / temperature, -1)
    s_bins = torch.cat([s_top, s_tail[:, None]], -1)
    return (t_bins.exp() * (t_bins - s_bins)).sum(-1) * temperature**2


class StoredScores:
    """Every shard of a `score` output, memory-mapped and indexed by sample id. Only a batch's rows are ever read
    (and widened to what the loss needs: int64 ids, fp32 log-probs), so a rank's memory stays flat however
    large the scores are, and the ranks of a node share one copy of the pages."""

    def __init__(self, scores_dir: str | Path):
        d = Path(scores_dir)
        manifest_path = d / "manifest.json"
        check_stage_output(d, "distill.scores", ("score",))
        if not manifest_path.is_file():
            raise ConfigError(f"distill.scores: {d} is not a finished stage-score output (no manifest.json)")
        self.manifest = read_manifest(manifest_path)
        verify_shards(d, self.manifest)
        self.where: dict[str, tuple[int, int, int, float]] = {}  # id -> (shard, start, end, beta)
        self.shards: list[tuple[dict[str, np.ndarray], dict[str, str]]] = []
        recipes: dict[str | None, str] = {}  # recipe id -> the first shard scored under it
        for k, shard in enumerate(self.manifest["shards"]):
            arrays, dtypes, metadata = mmap_safetensors(d / shard["file"])
            recipes.setdefault(metadata.get("recipe"), shard["file"])
            self.shards.append((arrays, dtypes))
            offsets, beta = np.asarray(arrays["offsets"]), np.asarray(arrays["beta"])
            for s, sid in enumerate(json.loads(metadata["ids"])):
                self.where[sid] = (k, int(offsets[s]), int(offsets[s + 1]), float(beta[s]))
        want = self.manifest.get("recipe")
        if len(recipes) > 1 or (want and set(recipes) != {want}):
            mixed = ", ".join(f"{file} ({rid or 'no recipe'})" for rid, file in recipes.items() if rid != want)
            raise InputError(str(manifest_path), None, f"shards of another scoring are mixed in: {mixed}, not "
                             f"recipe {want}; rerun stage score with --restart", "mixed")

    def rows(self, sample_id: str, name: str) -> np.ndarray:
        """The stored rows of one sample for tensor `name`, read from the mapped file."""
        shard, start, end, _ = self.where[sample_id]
        return self.shards[shard][0][name][start:end]

    def dtype(self, name: str) -> str:
        return self.shards[0][1][name]

    def check_covers(self, data: TokenizedSet) -> None:
        for i, sid in enumerate(data.ids):
            if sid not in self.where:
                raise ConfigError(f"distill.scores: sample {sid} of data.path has no scores; score the same data "
                                  "with the same data.max_len and data.overlong")
            _, start, end, _ = self.where[sid]
            n_targets = int(data.lengths[i] - data.prompt_lens[i])
            if end - start != n_targets:
                raise ConfigError(f"distill.scores: sample {sid} has {end - start} scored tokens but {n_targets} "
                                  "here; use the same data.max_len, data.overlong and tokenizer as stage score "
                                  f"(score used max_len {self.manifest['max_len']})")


def read_manifest(path: Path) -> dict:
    """A score output's manifest.json, or a named error for a garbled one (not a JSON traceback)."""
    try:
        manifest = json.loads(path.read_text())
        if all(isinstance(s, dict) and {"file", "sha256"} <= s.keys() for s in manifest["shards"]):
            return manifest
        problem = "a shard entry lacks its file or sha256"
    except (ValueError, KeyError, TypeError) as e:
        problem = f"{type(e).__name__}: {e}"
    raise InputError(str(path), None, f"not a score manifest ({problem}); delete DONE.json beside it and rerun "
                     "stage score", "damaged")


def verify_shards(scores_dir: Path, manifest: dict) -> None:
    """Collective: each rank checks its share of the shards against manifest.json (size, sha256) once, before
    anything is read; a damaged or truncated shard stops every rank with its name."""
    from train.engine import distributed as dist_

    problem = None
    for shard in manifest["shards"][dist_.rank()::dist_.world()]:
        path = scores_dir / shard["file"]
        if not path.is_file():
            problem = f"{path}: missing"
        elif "size" in shard and path.stat().st_size != shard["size"]:
            problem = f"{path}: {path.stat().st_size} bytes, {shard['size']} in manifest.json (truncated or replaced)"
        elif file_digest(path) != shard["sha256"]:
            problem = f"{path}: does not match its sha256 in manifest.json (damaged or changed since stage score)"
        if problem:
            problem += f"; delete {scores_dir / 'DONE.json'} and rerun stage score, which scores bad shards again"
            break
    dist_.raise_if_any(problem)


def stored_targets(scores: StoredScores, sample_ids: list[str]) -> dict[str, torch.Tensor]:
    """The teacher's stored top-k of these samples, concatenated in order: the only rows read from disk."""
    def stacked(name: str) -> torch.Tensor:
        return to_torch(np.concatenate([scores.rows(sid, name) for sid in sample_ids]), scores.dtype(name))

    return {"kd_ids": stacked("topk_ids").long(), "kd_lp": stacked("topk_logprobs").float(),
            "kd_tail": stacked("tail_logprob").float()}


def _offline_collate(data: TokenizedSet, scores: StoredScores, cfg: DistillConfig, pad_id: int):
    def collate_fn(indices) -> dict:
        batch = collate(data, indices, pad_id, cfg.data.packing, mask_prompt=True)
        weights = []
        for i in indices:
            _, start, end, beta = scores.where[data.ids[i]]
            b = cfg.distill.fixed_beta if cfg.distill.fixed_beta is not None else beta
            weights.append(np.full(end - start, 0.5 + b, dtype=np.float32))
        batch.update(stored_targets(scores, [data.ids[i] for i in indices]),
                     kd_weight=torch.from_numpy(np.concatenate(weights)))
        return batch

    return collate_fn


def full_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position over the whole vocabulary (online distill, top_k 0). [N, V] -> [N].
    `teacher_logits` may be log-probs: a log-softmax leaves them as they are."""
    s_lp = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    return (t.exp() * (t - s_lp)).sum(-1) * temperature**2


def nce_loss(ce: torch.Tensor, kd: torch.Tensor, kd_weight: torch.Tensor,
             lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """From per-target-position [N] CE and KD: (1 - lam) sum_t CE_t + lam sum_t (0.5 + beta) KD_t."""
    ce_sum, weighted = ce.sum(), (kd * kd_weight).sum()
    return (1 - lam) * ce_sum + lam * weighted, {"ce": ce_sum.detach(), "kd": kd.sum().detach(),
                                                 "kd_weighted": weighted.detach()}


def student_terms(module, batch: dict, chunk: int, kd_fn, *rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] CE, [N] `kd_fn(logits, *rows)`) at the student's target positions (row-major), the LM head run
    there only, `chunk` positions at a time when > 0 (model.loss_chunk_tokens): the [targets, vocab] fp32
    log-softmax that KD needs never exists whole."""
    hidden, labels, _, head = target_hidden(module, batch)

    def terms(logits: torch.Tensor, y: torch.Tensor, *r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.cross_entropy(logits, y, reduction="none"), kd_fn(logits, *r)

    return head_chunks(hidden, head, chunk, terms, labels, *rows)


def build(cfg: DistillConfig, ds_cfg: dict) -> TrainTask:
    data, tok = load_stage_data("distill", cfg, labels=("pos",))
    lam, temp, chunk = cfg.distill.lam, cfg.distill.temperature, cfg.model.loss_chunk_tokens
    teacher_dir = cfg.distill.scores if cfg.distill.mode == "offline" else cfg.distill.nat_dir
    check_same_prompt(Prompt.of(cfg.data), teacher_dir,
                      "the scores" if cfg.distill.mode == "offline" else "the NAT teacher")
    if cfg.distill.mode == "offline":
        scores = StoredScores(cfg.distill.scores)
        check_same_vocabulary(tok, scores.manifest["tokenizer"])
        scores.check_covers(data)
        collate_fn = _offline_collate(data, scores, cfg, tok.pad_token_id)

        def loss_fn(module, batch):
            ce, kd = student_terms(module, batch, chunk, lambda lg, *r: sparse_kd(lg, *r, temp),
                                   batch["kd_ids"], batch["kd_lp"], batch["kd_tail"])
            return nce_loss(ce, kd, batch["kd_weight"], lam)
    else:
        if cfg.data.packing:
            raise ConfigError("data.packing: online distillation supports padded batches only")
        loss_fn = _online_loss(cfg, tok)
        collate_fn = None
    model, save = full_model(cfg, ds_cfg, tok) if cfg.distill.full else lora_model(cfg, ds_cfg, "student")
    return TrainTask(name="distill", model=model, data=data, loss_fn=loss_fn, pad_id=tok.pad_token_id,
                     collate_fn=collate_fn, full_weights=cfg.distill.full,
                     save_fn=lambda module, out, **state: {**save(module, out, **state), "samples": len(data)})


def _online_loss(cfg: DistillConfig, tok):
    from train.engine import distributed as dist_
    from train.engine import precision
    from train.models.nat import load_nat_teacher
    from train.stages.score import sample_beta, teacher_hidden, teacher_stats

    nat_dir = Path(cfg.distill.nat_dir)
    check_stage_output(nat_dir, "distill.nat_dir", ("nat",), required=False)  # nat.json is checked next
    if not (nat_dir / NAT_JSON).is_file():
        raise ConfigError(f"distill.nat_dir: {nat_dir} is not a finished stage-nat output (no {NAT_JSON})")
    check_same_vocabulary(tok, json.loads((nat_dir / NAT_JSON).read_text())["base_model"])
    teacher = load_nat_teacher(nat_dir, "nat", precision.dtype(cfg.engine.precision, dist_.on_cpu()))
    lam, temp, k, chunk = cfg.distill.lam, cfg.distill.temperature, cfg.distill.top_k, cfg.model.loss_chunk_tokens
    fixed = cfg.distill.fixed_beta

    def loss_fn(module, batch):
        """The teacher's head runs at target positions, in score's chunks (the teacher is whole on every rank);
        for whole-vocabulary KD inside the student's own chunks, so no [targets, vocab] tensor exists whole."""
        teacher.to(batch["input_ids"].device)
        h_nat, h_neg, mask, t_head = teacher_hidden(teacher, batch, with_neg=fixed is None)
        stats = teacher_stats(h_nat, h_neg, t_head, k)
        beta = sample_beta(stats[-1], mask)[0] if fixed is None else torch.full((mask.shape[0],), fixed,
                                                                                 device=mask.device)
        weight = (0.5 + beta)[:, None].expand_as(mask)[mask]
        if k > 0:
            values, ids, tail = stats[:3]
            ce, kd = student_terms(module, batch, chunk, lambda lg, *r: sparse_kd(lg, *r, temp), ids, values, tail)
        else:
            def whole_kd(logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    t_logits = t_head(hidden).float()
                return full_kd(logits, t_logits, temp)

            ce, kd = student_terms(module, batch, chunk, whole_kd, h_nat)
        return nce_loss(ce, kd, weight, lam)

    return loss_fn


def main(cfg: DistillConfig) -> int:
    source = cfg.distill.scores if cfg.distill.mode == "offline" else cfg.distill.nat_dir
    if not Path(source).is_dir():
        raise TdgError(f"distill: {source} does not exist")
    return run_stage("distill", cfg, build, extra_inputs={"teacher": dir_digest(source)})
