"""What stage `score` found: the beta distribution, a histogram, and the samples at both ends.

Used by `tools/inspect_scores.py`. It reads only the shards' small tensors (beta, kl_mean) and,
for the listed samples, the prepared data the scorer read (path from the score's config.yaml).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from safetensors import safe_open

from train.errors import TdgError


@dataclass
class Betas:
    ids: list[str]
    beta: np.ndarray
    kl_mean: np.ndarray
    tokens: np.ndarray  # scored (rationale) tokens per sample


def read_betas(scores_dir: str | Path) -> Betas:
    d = Path(scores_dir)
    manifest = d / "manifest.json"
    if not manifest.is_file():
        raise TdgError(f"{d}: not a finished stage-score output (no manifest.json)")
    ids, beta, kl, tokens = [], [], [], []
    for shard in json.loads(manifest.read_text())["shards"]:
        with safe_open(str(d / shard["file"]), framework="pt") as f:
            ids += json.loads(f.metadata()["ids"])
            beta.append(f.get_tensor("beta").numpy())
            kl.append(f.get_tensor("kl_mean").numpy())
            tokens.append(np.diff(f.get_tensor("offsets").numpy()))
    return Betas(ids, np.concatenate(beta), np.concatenate(kl), np.concatenate(tokens))


def summary(b: Betas) -> dict:
    q = np.quantile(b.beta, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"samples": len(b.ids), "mean": float(b.beta.mean()), "std": float(b.beta.std()),
            **{f"p{p}": float(v) for p, v in zip([0, 10, 25, 50, 75, 90, 100], q, strict=True)},
            "weight_mean": float((0.5 + b.beta).mean()),
            "corr_beta_tokens": float(np.corrcoef(b.beta, b.tokens)[0, 1]) if b.beta.std() > 0 else 0.0}


def histogram_png(b: Betas, path: str | Path, bins: int = 40) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(b.beta, bins=bins, color="#4c72b0")
    ax.axvline(float(b.beta.mean()), color="#c44e52", linestyle="--", label=f"mean {b.beta.mean():.3f}")
    ax.set_xlabel("beta = tanh(mean KL(p_neg || p_nat))")
    ax.set_ylabel("positive samples")
    ax.set_title(f"NCE weights of {len(b.ids)} samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def extremes(b: Betas, n: int) -> tuple[list[int], list[int]]:
    """Indices of the n highest and n lowest beta (highest first, lowest first)."""
    order = np.argsort(b.beta, kind="stable")
    return [int(i) for i in order[::-1][:n]], [int(i) for i in order[:n]]


def sample_texts(scores_dir: str | Path, ids: list[str]) -> dict[str, dict]:
    """question/rationale/gold of `ids` from the prepared data the scorer read ({} if it is gone)."""
    from train.data.dataset import read_prepared

    cfg = Path(scores_dir) / "config.yaml"
    data_path = yaml.safe_load(cfg.read_text())["data"]["path"] if cfg.is_file() else ""
    if not data_path or not Path(data_path).is_dir():
        return {}
    table = read_prepared(data_path, labels=("pos",), columns=["id", "question", "rationale", "gold", "label"])
    wanted = set(ids)
    return {r["id"]: r for r in table.to_pylist() if r["id"] in wanted}


def format_report(scores_dir: str | Path, b: Betas, n: int, width: int = 160) -> str:
    s = summary(b)
    lines = [f"{s['samples']} scored samples in {scores_dir}",
             f"beta mean {s['mean']:.4f} std {s['std']:.4f}; min {s['p0']:.4f} p10 {s['p10']:.4f} "
             f"p25 {s['p25']:.4f} median {s['p50']:.4f} p75 {s['p75']:.4f} p90 {s['p90']:.4f} max {s['p100']:.4f}",
             f"KD weight (0.5 + beta) mean {s['weight_mean']:.4f}; correlation of beta with rationale length "
             f"{s['corr_beta_tokens']:+.3f}"]
    high, low = extremes(b, n)
    texts = sample_texts(scores_dir, [b.ids[i] for i in high + low])
    for title, picks in (("highest beta (the negative teacher disagrees most)", high), ("lowest beta", low)):
        lines += ["", title]
        for i in picks:
            sid = b.ids[i]
            lines.append(f"  {b.beta[i]:.4f}  {sid}  ({int(b.tokens[i])} tokens)")
            if sid in texts:
                t = texts[sid]
                for name in ("question", "rationale"):
                    flat = " ".join(t[name].split())
                    lines.append(f"      {name}: {flat[:width]}{'...' if len(flat) > width else ''}")
    return "\n".join(lines)
