"""What slurm/pipeline.sh submits for each stage config: its overrides, its output dir, its resolved paths.

The pipeline forwards one list of `key=value` overrides; each stage gets the ones that mean
something to it (a shared value of run.yaml, or a key of one of its sections: `optim.lr` goes to
the training stages, not to score or eval). An override that no stage config of the directory
takes is an error, not something dropped in silence.
"""

from __future__ import annotations

from pathlib import Path

from train import config
from train.errors import ConfigError
from train.stage_table import STAGES

# config file name -> stage, in submission order (pretrain.yaml is stage sft on the gold solutions)
PIPELINE = [("pretrain", "sft"), ("sft", "sft"), ("neg", "neg"), ("nat", "nat"), ("score", "score"),
            ("distill", "distill"), ("ranker", "ranker"), ("eval", "eval")]
# the inputs and outputs a dry run shows, where a stage has them
PATH_KEYS = ("model.path", "model.tokenizer", "data.path", "nat.neg_adapter", "score.nat_dir", "distill.scores",
             "distill.nat_dir", "eval.model", "eval.test", "eval.ranker", "engine.output_dir")


def config_class(stage: str) -> type:
    return getattr(config, STAGES[stage][2])


def stage_configs(config_dir: str | Path) -> list[tuple[str, Path]]:
    """(stage, config file) for every pipeline config present in `config_dir`, in submission order."""
    return [(stage, Path(config_dir) / f"{name}.yaml") for name, stage in PIPELINE
            if (Path(config_dir) / f"{name}.yaml").is_file()]


def overrides_for(stage: str, config_file: str | Path, overrides: list[str]) -> list[str]:
    """The overrides this stage takes; ConfigError for one that no stage config beside it takes."""
    mine = [o for o in overrides if config.is_override_for(config_class(stage), config_file, o)]
    siblings = stage_configs(Path(config_file).parent)
    for o in overrides:
        if o not in mine and not any(config.is_override_for(config_class(s), f, o) for s, f in siblings):
            raise ConfigError(f"override {o!r} is for no stage config in {Path(config_file).parent} "
                              f"(not a shared value of {config.RUN_VARS}, nor a section of any stage)")
    return mine


def resolved_paths(cfg) -> list[tuple[str, str]]:
    """(key, value) of the model, input and output paths a stage config resolves to."""
    out = []
    for key in PATH_KEYS:
        try:
            value = config.get_dotted(cfg, key)
        except ConfigError:
            continue
        if value:
            out.append((key, str(value)))
    return out


def write_stage_files(config_dir: str | Path, overrides: list[str], into: str | Path) -> list[str]:
    """For slurm/pipeline.sh, in one process: every stage config of `config_dir` resolved with the overrides for
    it. Writes, per config NAME.yaml, `into/NAME.fields` (NUL-separated: the stage, engine.output_dir, then its
    overrides) and `into/NAME.paths` (its resolved paths, one `key: value` line each), and `into/order` (the
    names in submission order). Any config or override error stops before a file is written."""
    into = Path(into)
    resolved = []
    for name, stage in PIPELINE:
        file = Path(config_dir) / f"{name}.yaml"
        if file.is_file():
            mine = overrides_for(stage, file, overrides)
            resolved.append((name, stage, mine, config.load_config(config_class(stage), file, mine)))
    for name, stage, mine, cfg in resolved:
        (into / f"{name}.fields").write_text("\0".join([stage, cfg.engine.output_dir, *mine]) + "\0")
        (into / f"{name}.paths").write_text("".join(f"    {key}: {value}\n" for key, value in resolved_paths(cfg)))
    (into / "order").write_text("".join(f"{name}\n" for name, *_ in resolved))
    return [name for name, *_ in resolved]
