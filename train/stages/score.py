"""Stage `score`: run the NAT teacher once over every POSITIVE sample and store what NCE needs.

Per sample i (over its rationale tokens t, i.e. the positions that predict a target token):
    beta_i = tanh( mean_t KL(p_neg,t || p_nat,t) )
where p_nat is the teacher with both branches and the gate (mode `nat`) and p_neg the negative
teacher alone (mode `neg`). The direction KL(p_neg || p_nat) follows the reference
implementation (DESIGN.md): samples where the negative teacher disagrees most get the most weight.
Per token it also stores the NAT teacher's top-k token ids and log-probs and the log of the
probability mass outside the top k, so `distill` needs no teacher in memory.

Sharding: samples (in prepared-data order) are cut into fixed shards of `score.shard_size`;
rank r takes the unfinished shards r, r+W, ..., one per round. Each shard is written atomically
(temp + rename) as `shards/shard-NNNNN.safetensors`; a restarted run skips finished shards. Under
ZeRO-3 every rank must make the same number of forward calls or the collectives hang, so in each
round ranks with less work run padding batches whose results are dropped. A stop signal
(SIGUSR1/SIGTERM) is agreed on by all ranks after each round: they exit 75 with every finished
shard on disk, and the rerun continues. At the end rank 0 checks that every positive sample id
appears exactly once and writes `manifest.json` and `DONE.json`.

Shard format (safetensors; metadata: `ids` JSON list, `top_k`, `recipe`: the id of recipe.json beside shards/):
    offsets        int64  [S+1]   token range of sample s: offsets[s]:offsets[s+1]
    beta, kl_mean  float32 [S]
    topk_ids       int16 (vocabulary <= 32,768) / int32  [T, k]
    topk_logprobs  float16/bfloat16 [T, k]
    tail_logprob   float32 [T]    log(1 - sum of the top-k probabilities)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from train.config import OptimConfig, ScoreConfig, save_config
from train.data.batching import TokenBudgetBatcher
from train.data.dataset import TokenizedSet, collate, read_prepared, tokenize_with
from train.data.prompt import Prompt, check_same_prompt
from train.data.tokenizer import load_tokenizer
from train.engine import distributed as dist_
from train.engine import output_lock, precision
from train.engine.ds_config import build_ds_config
from train.engine.memory import peak_memory
from train.engine.signals import EXIT_CHECKPOINTED, StopRequest
from train.errors import TdgError
from train.manifest import check_stage_output, dir_digest, file_digest, prepared_digest, write_done
from train.models.nat import NAT_JSON, load_nat_teacher, set_mode
from train.progress import progress
from train.stages.common import already_done, head_chunks, target_hidden

FORMAT = "tdg-scores-1"


RECIPE_JSON = "recipe.json"


def score_recipe(cfg: ScoreConfig, nat_dir: Path) -> dict:
    """What the stored scores depend on, the inputs by content: shards of two recipes must never be mixed."""
    return {"teacher": dir_digest(nat_dir), "data": prepared_digest(cfg.data.path), "top_k": cfg.score.top_k,
            "logprob_dtype": cfg.score.logprob_dtype, "shard_size": cfg.score.shard_size,
            "max_len": cfg.data.max_len, "overlong": cfg.data.overlong,
            "precision": precision.resolve(cfg.engine.precision, dist_.on_cpu()), **Prompt.of(cfg.data).record()}


def recipe_id(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _adopt_recipe(out: Path, recipe: dict, restart: bool) -> str | None:
    """Rank 0: record this run's recipe, or find the one the shards already in `out` were scored under. Another
    recipe is refused, naming what differs, unless `restart` (then those shards are deleted first)."""
    path = out / RECIPE_JSON
    shards = sorted((out / "shards").glob("shard-*.safetensors")) if (out / "shards").is_dir() else []
    saved = json.loads(path.read_text()) if path.is_file() else ({"written by": "an older version"} if shards else None)
    if saved is not None and saved != recipe:
        changed = [f"{k}: {saved.get(k)!r} -> {recipe.get(k)!r}" for k in sorted(set(saved) | set(recipe))
                   if saved.get(k) != recipe.get(k)]
        if not restart:
            return (f"{out}: its {len(shards)} shard(s) were scored under another recipe ({'; '.join(changed)}); "
                    "distill must never mix two: rerun with the old settings to continue them, or pass "
                    "--restart (score.restart=true) to delete them and score anew, or use a new engine.output_dir")
        print(f"[score] --restart: deleting {len(shards)} shard(s) of another recipe ({'; '.join(changed)})",
              flush=True)
        shutil.rmtree(out / "shards", ignore_errors=True)
        (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(recipe, indent=1, sort_keys=True))
    return None


def shard_path(out: Path, index: int) -> Path:
    return out / "shards" / f"shard-{index:05d}.safetensors"


def sample_beta(kl: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta, mean KL) per row: beta_i = tanh(mean over row i's mask positions of KL(p_neg || p_nat)).

    `kl` holds the [T] values at the mask positions in row-major order (as `tensor[mask]` gives them)."""
    rows = mask.nonzero()[:, 0]
    total = torch.zeros(mask.shape[0], dtype=kl.dtype, device=kl.device).index_add_(0, rows, kl)
    mean = total / mask.sum(-1).clamp(min=1)
    return torch.tanh(mean), mean


def tail_logprob(top_lp: torch.Tensor) -> torch.Tensor:
    """[N] log of the probability mass outside the top-k, from [N, k] top-k log-probs (the KD's k + 1-th bin)."""
    return torch.log1p(-top_lp.exp().sum(-1).clamp(max=1.0 - 1e-7))


SCORE_CHUNK = 1024  # target positions per head call for a whole teacher: one chunk's [1024, vocab] fp32 at a time


@torch.no_grad()
def teacher_hidden(model, batch: dict, with_neg: bool = True) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor, torch.nn.Module]:
    """(NAT teacher's [N, H] head input at the N target positions, the same in neg mode or None, [B, L-1] target
    mask, the LM head). The head itself is left to the caller, to run in chunks (`teacher_stats`); without
    `with_neg` (a fixed beta needs no KL) the neg-mode forward pass is skipped."""
    set_mode(model, "nat")
    h_nat, _, mask, head = target_hidden(model, batch)
    if not with_neg:
        return h_nat, None, mask, head
    set_mode(model, "neg")
    h_neg = target_hidden(model, batch)[0]
    set_mode(model, "nat")
    return h_nat, h_neg, mask, head


@torch.no_grad()
def teacher_stats(h_nat: torch.Tensor, h_neg: torch.Tensor | None, head: torch.nn.Module, top_k: int,
                  chunk: int = SCORE_CHUNK) -> tuple[torch.Tensor, ...]:
    """Per target position, `chunk` positions at a time (0: all at once), so that no [targets, vocab] fp32 tensor
    exists whole: the NAT teacher's top-k log-probs [N, k], their ids [N, k] and the tail bin [N] when `top_k` > 0,
    then KL(p_neg || p_nat) [N] when `h_neg` is given. Nothing asked (top_k 0, no `h_neg`): no head call."""
    if top_k <= 0 and h_neg is None:
        return ()

    def stats(logits_nat: torch.Tensor, *hidden_neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lp_nat = F.log_softmax(logits_nat, -1)
        out: tuple[torch.Tensor, ...] = ()
        if top_k > 0:
            values, ids = lp_nat.topk(top_k, dim=-1)
            out = (values, ids, tail_logprob(values))
        if hidden_neg:
            lp_neg = F.log_softmax(head(hidden_neg[0]).float(), -1)
            out += ((lp_neg.exp() * (lp_neg - lp_nat)).sum(-1),)
        return out

    return head_chunks(h_nat, head, chunk, stats, *(() if h_neg is None else (h_neg,)))


def score_batch(model, batch: dict, top_k: int, chunk: int = SCORE_CHUNK) -> list[dict]:
    """Teacher outputs for one padded batch: one dict of CPU tensors per sample.

    The LM head runs at target positions only, for the nat and the neg pass, and the vocabulary-wide work
    (log-softmax, KL, top-k) `chunk` positions at a time (`teacher_stats`). Everything is computed on the device
    and copied to the host once."""
    h_nat, h_neg, mask, head = teacher_hidden(model, batch)
    values, ids, tail, kl = teacher_stats(h_nat, h_neg, head, top_k, chunk)
    beta, kl_mean = sample_beta(kl, mask)
    counts = mask.sum(-1).tolist()
    ids, values, tail = ids.to(torch.int32).cpu(), values.cpu(), tail.cpu()
    beta, kl_mean = beta.cpu(), kl_mean.cpu()
    return [{"beta": float(beta[row]), "kl_mean": float(kl_mean[row]), "topk_ids": i, "topk_logprobs": v,
             "tail_logprob": t}
            for row, (i, v, t) in enumerate(zip(ids.split(counts), values.split(counts), tail.split(counts),
                                                strict=True))]


def _write_shard(path: Path, ids: list[str], results: list[dict], top_k: int, dtype: torch.dtype,
                 ids_dtype: torch.dtype, recipe: str) -> None:
    lengths = [len(r["tail_logprob"]) for r in results]
    tensors: dict[str, torch.Tensor] = {
        "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
        "beta": torch.tensor([r["beta"] for r in results], dtype=torch.float32),
        "kl_mean": torch.tensor([r["kl_mean"] for r in results], dtype=torch.float32),
        "topk_ids": torch.cat([r["topk_ids"] for r in results]).to(ids_dtype).contiguous(),
        "topk_logprobs": torch.cat([r["topk_logprobs"] for r in results]).to(dtype).contiguous(),
        "tail_logprob": torch.cat([r["tail_logprob"] for r in results]).float().contiguous(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"ids": json.dumps(ids), "top_k": str(top_k), "format": FORMAT,
                                                   "recipe": recipe})
        os.replace(tmp, path)
        _write_atomic(_digest_path(path), json.dumps({"size": path.stat().st_size, "sha256": file_digest(path)}))
    except Exception as e:  # noqa: BLE001 -- safetensors reports a full disk as its own error type
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free / 2**30
        raise TdgError(f"{path}: cannot write the shard ({type(e).__name__}: {e}); {free:.2f} GiB free there") from None


def _digest_path(shard: Path) -> Path:
    """Beside each finished shard, its size and sha256: a restart scores again any shard that no longer matches."""
    return shard.with_name(shard.name + ".sha256")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_problem(path: Path) -> str | None:
    """Why a finished shard cannot be kept (missing, no recorded digest, or changed since written), or None."""
    record = _digest_path(path)
    if not path.is_file():
        return f"{path}: missing"
    try:
        want = json.loads(record.read_text())
    except (OSError, ValueError):
        return f"{path}: no readable {record.name} (written before shards were recorded, or cut off)"
    if path.stat().st_size != want["size"] or file_digest(path) != want["sha256"]:
        return f"{path}: changed since it was written (size or sha256 differs from {record.name})"
    return None


def read_shard_ids(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["ids"])


def plan_shards(lengths: np.ndarray, shard_size: int, max_tokens: int) -> list[list[np.ndarray]]:
    """Batches (global sample indices) of every shard; length-sorted inside a shard."""
    plans = []
    for start in range(0, len(lengths), shard_size):
        idx = np.arange(start, min(start + shard_size, len(lengths)))
        batcher = TokenBudgetBatcher(lengths[idx], max_tokens, shuffle=False, group_size=len(idx))
        plans.append([idx[b] for b in batcher.batches(0)])
    return plans


def main(cfg: ScoreConfig) -> int:
    out = Path(cfg.engine.output_dir)
    nat_dir = Path(cfg.score.nat_dir)
    if already_done("score", out, asdict(cfg)):
        return 0
    check_stage_output(nat_dir, "score.nat_dir", ("nat",), required=False)  # nat.json is checked next
    if not (nat_dir / NAT_JSON).is_file():
        raise TdgError(f"score.nat_dir: {nat_dir} is not a finished stage-nat output (no {NAT_JSON})")
    zero3 = cfg.engine.ds_config != "none"
    device = dist_.setup(cfg.engine.dist_timeout_minutes, use_deepspeed=zero3)  # without ZeRO: no DeepSpeed
    output_lock.hold(out, "score")
    world, rank = dist_.world(), dist_.rank()
    t0 = time.time()
    spec = json.loads((nat_dir / NAT_JSON).read_text())
    check_same_prompt(Prompt.of(cfg.data), nat_dir, "the NAT teacher")
    tok = load_tokenizer(spec["base_model"])
    table = read_prepared(cfg.data.path, labels=("pos",))
    data = tokenize_with(table, tok, cfg.data)
    if len(data) == 0:
        raise TdgError(f"{cfg.data.path}: no positive sample fits data.max_len={cfg.data.max_len}: {data.describe()}")
    lengths = data.lengths
    plans = plan_shards(lengths, cfg.score.shard_size, cfg.data.max_tokens)
    recipe = score_recipe(cfg, nat_dir)
    problem = None
    if dist_.is_main():
        print(f"[score] pos: {data.describe()}", flush=True)
        problem = _adopt_recipe(out, recipe, cfg.score.restart)
        if problem is None:
            (out / "shards").mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
    dist_.raise_if_any(problem)
    existing = [i for i in range(len(plans)) if shard_path(out, i).is_file()]
    checks = dist_.all_gather_object([(i, shard_problem(shard_path(out, i))) for i in existing[rank::world]])
    bad = sorted((i, problem) for per_rank in checks for i, problem in per_rank if problem)
    if bad and dist_.is_main():
        print(f"[score] {len(bad)} finished shard(s) cannot be kept, scoring them again: "
              + "; ".join(problem for _, problem in bad[:3]) + (" ..." if len(bad) > 3 else ""), flush=True)
        for i, _ in bad:
            shard_path(out, i).unlink(missing_ok=True)
    dist_.barrier()
    kept = set(existing) - {i for i, _ in bad}
    todo = [i for i in range(len(plans)) if i not in kept]
    mine = todo[rank::world]
    rounds = -(-len(todo) // world)  # round k: rank r scores shard todo[k * world + r], if there is one

    bf16 = precision.resolve(cfg.engine.precision, dist_.on_cpu()) == "bf16"
    ds_cfg = build_ds_config(cfg.engine.ds_config, OptimConfig(), world, bf16=bf16) if zero3 else None
    model = load_nat_teacher(nat_dir, "nat", precision.dtype(cfg.engine.precision, dist_.on_cpu()), ds_cfg,
                             device=None if zero3 else device)
    if zero3:
        import deepspeed

        model = deepspeed.initialize(model=model, config=ds_cfg)[0].module
    model.eval()
    lp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.score.logprob_dtype]
    ids_dtype = torch.int16 if model.config.vocab_size <= 2**15 else torch.int32  # a 32k Llama vocabulary fits

    def batch_of(indices) -> dict:
        return {k: v.to(device) for k, v in collate(data, indices, tok.pad_token_id, packing=False).items()}

    # under ZeRO-3 each head call gathers the partitioned head: one call per pass, the same on every rank
    chunk = 0 if zero3 else SCORE_CHUNK

    bar = progress(len(mine), "score (rank 0 shards)", "shard", enabled=dist_.is_main() and cfg.engine.progress)
    t_loop = time.time()
    with StopRequest() as stop:
        for k in range(rounds):
            if k < len(mine):
                i = mine[k]
                results: dict[int, dict] = {}
                for b in plans[i]:
                    for sample, res in zip(b, score_batch(model, batch_of(b), cfg.score.top_k, chunk),
                                           strict=True):
                        results[int(sample)] = res
                order = sorted(results)
                _write_shard(shard_path(out, i), [data.ids[s] for s in order], [results[s] for s in order],
                             cfg.score.top_k, lp_dtype, ids_dtype, recipe_id(recipe))
                bar.update(1)
            if zero3:  # under ZeRO-3 every rank makes as many forward calls in a round as the busiest one
                round_calls = [len(plans[todo[j]]) for j in range(k * world, min((k + 1) * world, len(todo)))]
                for _ in range(max(round_calls) - (len(plans[mine[k]]) if k < len(mine) else 0)):
                    score_batch(model, batch_of(np.array([0])), cfg.score.top_k, chunk)
            if dist_.any_rank(stop.requested, device):  # a signal often reaches only some ranks
                bar.close()
                if dist_.is_main():
                    print(f"[score] stop requested: {min(k + 1, len(mine))} of this rank's {len(mine)} shards written "
                          f"(each rank finished its current one); exit {EXIT_CHECKPOINTED}, resubmit to continue",
                          flush=True)
                return EXIT_CHECKPOINTED
    bar.close()
    loop_seconds = time.time() - t_loop
    dist_.barrier()
    if dist_.is_main():
        _finish(cfg, out, nat_dir, data, len(plans), t0, loop_seconds, recipe_id(recipe))
    dist_.barrier()
    return 0


def _finish(cfg: ScoreConfig, out: Path, nat_dir: Path, data: TokenizedSet, n_shards: int, t0: float,
            loop_seconds: float, recipe: str) -> None:
    """Check every positive sample was scored exactly once; write manifest.json and DONE.json."""
    expected_ids = data.ids
    seen: dict[str, int] = {}
    shards, betas = [], []
    for i in range(n_shards):
        path = shard_path(out, i)
        if not path.is_file():
            raise TdgError(f"{path}: shard missing after scoring")
        ids = read_shard_ids(path)
        for sid in ids:
            seen[sid] = seen.get(sid, 0) + 1
        with safe_open(str(path), framework="pt") as f:
            betas.append(f.get_tensor("beta").numpy())
        shards.append({"file": path.relative_to(out).as_posix(), "samples": len(ids), "size": path.stat().st_size,
                       "sha256": file_digest(path)})
    missing = [s for s in expected_ids if s not in seen]
    twice = [s for s, n in seen.items() if n > 1]
    extra = sorted(set(seen) - set(expected_ids))
    if missing or twice or extra:
        raise TdgError(f"{out}: scores are inconsistent: {len(missing)} samples missing (e.g. {missing[:3]}), "
                       f"{len(twice)} scored twice (e.g. {twice[:3]}), {len(extra)} unknown (e.g. {extra[:3]})")
    beta = np.concatenate(betas)
    manifest = {"format": FORMAT, "samples": len(expected_ids), "shards": shards, "top_k": cfg.score.top_k,
                "recipe": recipe,
                "max_len": cfg.data.max_len, "nat_dir": str(nat_dir.resolve()),
                "tokenizer": json.loads((nat_dir / NAT_JSON).read_text())["base_model"],
                **Prompt.of(cfg.data).record(), "data": data.report()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    metrics = {"samples": len(expected_ids), "shards": n_shards, "data": data.report(), "beta_mean": float(beta.mean()),
               "beta_std": float(beta.std()), "beta_min": float(beta.min()), "beta_max": float(beta.max()),
               "seconds": round(time.time() - t0, 2), "world_size": dist_.world(),
               "rank0_scoring_seconds": round(loop_seconds, 2),  # its shards only: no load, tokenizing or checks
               **peak_memory()}
    scored_under = json.loads((out / RECIPE_JSON).read_text())
    write_done(out, stage="score", config=asdict(cfg),
               inputs={"prepared": scored_under["data"], "nat": scored_under["teacher"]},
               metrics=metrics)
    print(f"[score] {len(expected_ids)} samples in {n_shards} shards; beta mean {metrics['beta_mean']:.4f} "
          f"(min {metrics['beta_min']:.4f}, max {metrics['beta_max']:.4f})", flush=True)
