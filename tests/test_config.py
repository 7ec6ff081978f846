import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from train.cli import STAGES
from train.config import DataConfig, load_config, save_config
from train.errors import ConfigError


@dataclasses.dataclass
class Optim:
    lr: float = 3e-4
    warmup: int = 200
    schedule: str = "cosine"


@dataclasses.dataclass
class Stage:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: Optim = dataclasses.field(default_factory=Optim)
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])
    init_from: str | None = None


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\ndata:\n  max_tokens: 1024\n")
    cfg = load_config(Stage, f, ["optim.lr=1e-4", "data.max_tokens=2048", "targets=[q_proj]", "init_from=x"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.max_tokens == 2048 and cfg.targets == ["q_proj"] and cfg.init_from == "x"
    assert cfg.optim.warmup == 200  # untouched default


def test_int_and_exponent_strings_are_accepted_for_float(tmp_path):
    assert load_config(Stage, None, ["optim.lr=1"]).optim.lr == 1.0
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 3e-4\n")  # YAML 1.1 parses this as the string '3e-4'
    assert load_config(Stage, f).optim.lr == pytest.approx(3e-4)


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Stage, None, ["optim.lrr=1e-4"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "optim.lr" in msg and "optim.warmup" in msg


def test_unknown_key_in_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("dataa: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key dataa"):
        load_config(Stage, f)


@pytest.mark.parametrize("override,key,expected", [
    ("data.max_tokens=lots", "data.max_tokens", "int"),
    ("data.packing=3", "data.packing", "bool"),
    ("optim.lr=true", "optim.lr", "float"),
    ("targets=q_proj", "targets", "list[str]"),
])
def test_wrong_type_names_key_value_and_type(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(Stage, None, [override])
    msg = str(e.value)
    assert key in msg and expected in msg and override.split("=")[1] in msg.lower()


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Stage, None, ["optim.lr"])
    f = tmp_path / "broken.yaml"
    f.write_text("optim: [\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(Stage, f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Stage, tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(Stage, None, ["optim.lr=5e-5", "data.packing=true"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 5e-5
    assert load_config(Stage, tmp_path / "config.yaml") == cfg


def test_every_shipped_stage_config_loads():
    from pathlib import Path

    from train import config

    classes = {"neg": config.NegConfig, "nat": config.NatConfig, "sft": config.SftConfig,
               "pretrain": config.SftConfig, "score": config.ScoreConfig, "distill": config.DistillConfig,
               "ranker": config.RankerConfig, "eval": config.EvalConfig, "ablation": config.AblationConfig,
               "dpo": config.DpoConfig, "redi": config.RediConfig, "sample": config.SampleConfig}
    files = sorted(f for f in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
                   if f.name != config.RUN_VARS)
    assert len(files) >= 14
    for f in files:
        cfg = load_config(classes[f.stem], f)
        assert "${" not in yaml.safe_dump(config.to_dict(cfg)), f  # every shared value resolved


SHIPPED = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*/*.yaml")
                 if p.name != "run.yaml")  # run.yaml: the shared values the stage configs refer to


def _shipped(path: Path):
    stage = "sft" if path.stem == "pretrain" else path.stem
    _, module, cls = STAGES[stage]
    return load_config(getattr(importlib.import_module(module), cls), path)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_with_its_stage(path):
    """A misspelt key in configs/llama7b would otherwise surface only on the cluster, after the queue."""
    assert _shipped(path).engine.output_dir


@pytest.mark.parametrize("family", sorted({p.parent.name for p in SHIPPED}))
def test_shipped_stage_configs_feed_each_other(family):
    """Each stage reads the directory the stage before it writes, from the same data and base model."""
    cfg = {p.stem: _shipped(p) for p in SHIPPED if p.parent.name == family}
    out = {name: c.engine.output_dir for name, c in cfg.items()}
    assert cfg["nat"].nat.neg_adapter == out["neg"]
    assert cfg["score"].score.nat_dir == out["nat"]
    assert cfg["distill"].distill.scores == out["score"]
    assert cfg["eval"].eval.ranker == out["ranker"]
    assert cfg["eval"].eval.model in (out["distill"], str(Path(out["distill"]).parent / "export"))  # or its export
    trained = [name for name in ("sft", "neg", "nat", "score", "distill", "ranker", "dpo", "redi") if name in cfg]
    assert len({cfg[name].data.path for name in trained}) == 1
    teacher = {cfg[name].model.path for name in ("neg", "nat")}
    student = {cfg[name].model.path for name in ("sft", "distill", "ranker") if name in cfg}
    assert len(teacher) == 1 and len(student) == 1  # large-teacher: a 70B teacher, a 7B student
    if "ablation" in cfg:
        a = cfg["ablation"].ablation
        assert (a.data, a.base_model, a.ranker) == (cfg["neg"].data.path, cfg["neg"].model.path, out["ranker"])


def test_grad_accum_is_derived_from_the_global_batch_for_any_world_size():
    from train.config import OptimConfig
    from train.engine.ds_config import effective_optim

    recipe = OptimConfig(global_batch_tokens=65536)
    assert [effective_optim(recipe, 4096, world).grad_accum for world in (1, 2, 8, 16)] == [16, 8, 2, 1]
    assert effective_optim(OptimConfig(grad_accum=3), 4096, 8).grad_accum == 3  # 0: grad_accum as given
    with pytest.raises(ConfigError, match=r"65,536 cannot be met on 3 rank\(s\) with data.max_tokens=4,096: it "
                                          r"must be a multiple of ranks x max_tokens = 12,288 \(nearest: 61,440 or "
                                          r"73,728\)"):
        effective_optim(recipe, 4096, 3)
    with pytest.raises(ConfigError, match="cannot be met on 32 rank"):  # less than one micro-batch per rank
        effective_optim(recipe, 4096, 32)


def test_cluster_configs_keep_their_batch_on_any_number_of_nodes():
    """Every training stage of a cluster config states its global batch in tokens, so a 2-node job trains the
    recipe a 1-node job does (grad_accum derived): without it the batch grows with the node count."""
    from train.engine.ds_config import effective_optim

    for (family, name), cfg in {(p.parent.name, p.stem): _shipped(p) for p in SHIPPED}.items():
        if family == "tiny" or name not in ("sft", "neg", "nat", "distill", "ranker", "dpo", "redi"):
            continue
        assert cfg.optim.global_batch_tokens > 0, (family, name)
        batches = {w * effective_optim(cfg.optim, cfg.data.max_tokens, w).grad_accum * cfg.data.max_tokens
                   for w in (1, 2, 8)}
        assert batches == {cfg.optim.global_batch_tokens}, (family, name)


def test_shipped_configs_choose_the_zero_stage_by_the_rule():
    """LoRA on a base that fits one GPU: ZeRO-2 (frozen base replicated); a teacher that does not: ZeRO-3,
    scored as ZeRO-3 inference; a teacher that fits: scored without ZeRO (docs/stages.md, "Choosing the ZeRO stage")."""
    cfg = {(p.parent.name, p.stem): _shipped(p) for p in SHIPPED}
    for name in ("sft", "neg", "nat", "distill", "ranker", "dpo", "redi"):
        assert cfg["llama7b", name].engine.ds_config == "zero2"
    assert cfg["llama7b", "score"].engine.ds_config == "none"
    for name in ("neg", "nat"):
        assert cfg["large-teacher", name].engine.ds_config == "zero3"
        assert cfg["large-teacher", name].model.gradient_checkpointing
    assert cfg["large-teacher", "score"].engine.ds_config == "zero3"
    for name in ("distill", "ranker"):
        assert cfg["large-teacher", name].engine.ds_config == "zero2"


def test_attention_defaults_to_the_fastest_installed_kernel_and_refuses_unknown_ones(monkeypatch):
    import importlib.util

    import torch

    from train.config import ModelConfig
    from train.models.loading import attention

    assert ModelConfig().attn_implementation == "auto" and attention("eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention("auto") == "sdpa"  # a CPU: PyTorch's fused kernels
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else
                        real_find_spec(name))
    assert attention("auto") == "flash_attention_2"  # a GPU with flash-attn installed
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        load_config(importlib.import_module("train.config").SftConfig, None,
                    ["model.path=x", "model.attn_implementation=flash"])


@pytest.mark.parametrize("override,message", [
    ("optim.warmup_steps=-5", "optim.warmup_steps: -5 is outside its range [0, inf)"),
    ("optim.min_lr_ratio=3", "optim.min_lr_ratio: 3 is outside its range [0, 1]"),
    ("lora.dropout=1.5", "lora.dropout: 1.5 is outside its range [0, 1)"),
    ("optim.lr=nan", "optim.lr: 'nan' is not a finite number"),
    ("optim.grad_clip=.inf", "optim.grad_clip: inf is not a finite number"),
    ("optim.betas=[0.9,1.5]", "optim.betas: 1.5 is outside its range [0, 1)"),
    ("data.max_tokens=0", "data.max_tokens: 0 is outside its range [1, inf)"),
    ("engine.keep_last=0", "engine.keep_last: 0 is outside its range [1, inf)"),
])
def test_impossible_numbers_are_refused_as_the_config_is_read(override, message):
    """They trained before (a schedule above its peak with a negative warmup and min_lr_ratio 3) or failed deep
    inside torch (an lr of NaN, a dropout of 1.5)."""
    from train.config import NegConfig

    with pytest.raises(ConfigError) as e:
        load_config(NegConfig, None, ["model.path=m", "data.path=d", "engine.output_dir=o", override])
    assert message in str(e.value)


def test_every_range_names_a_setting_whose_default_is_inside_it():
    from train.config import RANGES, _check_range

    for cls, ranges in RANGES.items():
        assert set(ranges) <= {f.name for f in dataclasses.fields(cls)}, cls
        defaults = cls()
        for name, interval in ranges.items():
            value = getattr(defaults, name)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                _check_range(f"{cls.__name__}.{name}", v, interval)


def test_a_stage_refuses_an_impossible_setting_in_one_line_before_loading_anything(capsys):
    from train.cli import main as tdg

    assert tdg(["neg", "--config", "configs/tiny/neg.yaml", "model.path=/nonexistent", "data.path=/nonexistent",
                "engine.output_dir=/nonexistent/out", "optim.warmup_steps=-5"]) == 2
    err = capsys.readouterr().err
    assert "optim.warmup_steps: -5 is outside its range [0, inf)" in err and "Traceback" not in err
