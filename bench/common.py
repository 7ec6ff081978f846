"""Helpers shared by the bench scripts: where the data is, and how a result row is recorded."""

from __future__ import annotations

import contextlib
import platform
import time
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tdg-math-gpt35"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("| date | benchmark | device | versions | baseline | measured | ratio | goal |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |\n")


def versions() -> str:
    import importlib.metadata as md

    parts = [f"py{platform.python_version()}"]
    for pkg in ("torch", "deepspeed", "transformers", "math-verify"):
        with contextlib.suppress(md.PackageNotFoundError):
            parts.append(f"{pkg} {md.version(pkg)}")
    return ", ".join(parts)


def device() -> str:
    import os

    return f"CPU x{os.cpu_count()} ({platform.machine()})"


def record(benchmark: str, baseline: str, measured: str, ratio: str, goal: str, dev: str | None = None) -> None:
    """Append one row to bench/RESULTS.md (creating the table if needed) and print it."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach row is one run of a script in bench/; ratios are "
                           "measured against a baseline run in the same process or session.\n\n" + HEADER)
    row = (f"| {time.strftime('%Y-%m-%d')} | {benchmark} | {dev or device()} | {versions()} | {baseline} | "
           f"{measured} | {ratio} | {goal} |\n")
    with open(RESULTS, "a") as f:
        f.write(row)
    print(row, end="")


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def demo_outputs(path: str | Path) -> Path:
    """A finished `tdg demo` output (its prepared data, base, neg, nat and scores); runs the demo if absent."""
    from train.manifest import read_done
    from train.stages.demo import DemoOptions, run_demo

    out = Path(path)
    if read_done(out / "score") is None:
        run_demo(DemoOptions(output=str(out)))
    return out


def demo_bench_args(doc: str, steps: int | None, repeats: bool = True, extra=None):
    """The command line every demo-based bench takes: --demo, --steps (unless None), (alternating) --repeats,
    and what `extra(parser)` adds."""
    import argparse

    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--demo", default="demo_out", help="a finished `tdg demo` output (run first if absent)")
    if steps is not None:
        ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    if repeats:
        ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each variant (median reported)")
    if extra is not None:
        extra(ap)
    return ap.parse_args()


def demo_stage_overrides(demo: Path, steps: int, *extra: str) -> list[str]:
    """One rank, ZeRO-2, `steps` steps, no checkpoints or progress bar, on the demo's base model and data."""
    return [f"model.path={demo / 'pretrain/model'}", f"data.path={demo / 'prepared'}", f"optim.max_steps={steps}",
            "engine.ds_config=zero2", "engine.save_every=0", "engine.progress=false", *extra]


def run_stage_in_process(stage: str, config: str, overrides: list[str]) -> dict:
    """Run a training stage in this process as a world of one (CPU); return its DONE.json metrics."""
    import importlib
    import os

    from train.cli import STAGES
    from train.config import load_config
    from train.manifest import read_done

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _, module, cls_name = STAGES[stage]
    import train.config as config_mod

    cfg = load_config(getattr(config_mod, cls_name), CONFIGS / f"{config}.yaml", overrides)
    code = importlib.import_module(module).main(cfg)
    if code != 0:
        raise RuntimeError(f"{stage} exited with {code}")
    return read_done(cfg.engine.output_dir)["metrics"]


def stage_timer(stage: str, config: str, overrides: list[str], out_root: str | Path,
                metric: str = "step_seconds_median", seen: list[dict] | None = None):
    """A zero-argument variant for `alternate`: each call runs the stage in process into a fresh
    output dir under `out_root` and returns DONE.json's `metric` (all metrics appended to `seen`)."""
    runs = iter(range(1_000_000))

    def run() -> float:
        metrics = run_stage_in_process(stage, config, [*overrides, f"engine.output_dir={out_root}/{next(runs)}"])
        if seen is not None:
            seen.append(metrics)
        return metrics[metric]

    return run


def alternate(variants: dict, repeats: int) -> dict[str, list[float]]:
    """Run each zero-argument variant `repeats` times, interleaved (A B A B ...), so that drift in
    the machine's speed (shared CPUs vary by 10-20% over minutes) hits every variant alike."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


def spread(values: list[float], scale: float = 1000.0, digits: int = 0) -> str:
    return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}"
