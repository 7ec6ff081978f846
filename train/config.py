"""Typed stage configs: a YAML file plus dotted `key=value` overrides from the command line.

Every stage has one dataclass (sections are nested dataclasses). Loading validates strictly:
an unknown key names itself and the valid keys; a wrong type names the key, the value and the
expected type. The resolved config is written next to every stage's output (`config.yaml`).

Shared values: a `run.yaml` beside a stage config holds values every config in that directory can
refer to as `${name}` (e.g. `model.path: ${base_model}`, `engine.output_dir: ${run_dir}/neg`;
OmegaConf interpolation, so `${oc.env:SCRATCH}` reads the environment). An override `name=value`
without a dot sets a shared value; a dotted one sets a stage key, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from train.data.prompt import DEFAULT_TEMPLATE, check_template
from train.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass
class DataConfig:
    """Where the prepared data is and how it is cut into batches."""

    path: str = ""  # a directory written by `tdg prepare`
    max_len: int = 1024  # longest sample in tokens (BOS + prompt + rationale + EOS); see `tdg prepare --tokenizer`
    overlong: Literal["drop", "truncate"] = "drop"  # a longer sample: dropped and counted, or cut (loses its ending)
    prompt_template: str = DEFAULT_TEMPLATE  # the prompt, with {question}: the same string in every stage and eval
    # plain: BOS + template; chat: the template is the user message of the tokenizer's chat template (special
    # tokens and generation prompt from the template); recorded and checked like the template
    prompt_format: Literal["plain", "chat"] = "plain"  # plain | chat (the tokenizer's apply_chat_template)
    system_prompt: str = ""  # chat only: the system message (empty: none)
    max_tokens: int = 4096  # token budget of one micro-batch (padded tokens count)
    packing: bool = False  # one row per micro-batch, samples concatenated, attention kept per sample
    mask_prompt: bool = True  # no loss on the question tokens
    group_size: int = 512  # samples per length-grouping window (bigger: less padding, less random)
    seed: int = 0  # seeds the batch order (the same on every rank; differs per epoch) and the held-out split
    # share of QUESTIONS (hashed, as the ranker's split) kept out of training: their loss is evaluated at each
    # epoch end (TensorBoard heldout/*, DONE.json), to see overfitting over many epochs
    heldout_fraction: float = 0.0  # 0: every sample trains; e.g. 0.05 for a held-out loss per epoch

    def validate(self) -> None:
        check_template(self.prompt_template)
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"data.heldout_fraction: between 0 and 1 (exclusive), got {self.heldout_fraction}")
        if self.system_prompt and self.prompt_format != "chat":
            raise ConfigError("data.system_prompt: needs data.prompt_format=chat (a plain prompt has no system "
                              "message; put the text in data.prompt_template)")
        if self.max_len < 2 or self.max_tokens < 1:
            raise ConfigError("data: max_len >= 2 and max_tokens >= 1 required")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float. Raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Any or isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: value {value!r} has the wrong type; expected {_type_name(tp)}")


def _build(cls: type[T], raw: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise ConfigError(
                f"unknown key {prefix}{k!s}; valid keys here: {', '.join(sorted(prefix + f for f in fields))}"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    for name, interval in RANGES.get(cls, {}).items():
        if kwargs.get(name) is not None:
            for v in kwargs[name] if isinstance(kwargs[name], list) else [kwargs[name]]:
                _check_range(prefix + name, v, interval)
    return cls(**kwargs)


def _check_range(key: str, value: float, interval: str) -> None:
    """`interval` in the usual notation: "[0, 1)", "(0, inf)"; an error naming the key when `value` is outside."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below):
        raise ConfigError(f"{key}: {value:g} is outside its range {interval}")


def _validate_tree(obj: Any) -> None:
    """Run `validate()` on every section, defaults included, innermost first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=3` -> ("a.b", 3); the value is parsed as YAML so types come out natural."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-4)")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        out.append((key, value))
    return out


RUN_VARS = "run.yaml"  # shared values for every stage config in its directory


def _read_mapping(p: Path) -> dict:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config keys")
    return raw


def shared_values(config: str | Path | None) -> dict:
    """The `run.yaml` beside a stage config (empty without one)."""
    if config is None:
        return {}
    f = Path(config).parent / RUN_VARS
    return _read_mapping(f) if f.is_file() and f.resolve() != Path(config).resolve() else {}


def _interpolate(raw: dict, shared: dict, where: str) -> dict:
    """`${name}` references resolved against the shared values (and each other); the shared keys dropped."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if "${" not in yaml.safe_dump(raw) + yaml.safe_dump(shared):
        return raw
    try:
        resolved = OmegaConf.to_container(OmegaConf.create({**shared, **raw}), resolve=True)
    except OmegaConfBaseException as e:
        known = f"shared values from {RUN_VARS}: {', '.join(shared)}" if shared else f"no {RUN_VARS} beside it"
        reason = str(e.msg).splitlines()[0]  # the rest repeats full_key and the object type
        raise ConfigError(f"{where}{e.full_key or 'interpolation'}: {reason} ({known})") from None
    return {k: v for k, v in resolved.items() if k not in shared}


def is_override_for(cls: type, config: str | Path | None, override: str) -> bool:
    """Whether `key=value` means something to a `cls` config: a shared value of its run.yaml or one of its
    sections. slurm/pipeline.sh sends each stage the overrides that are for it."""
    key = override.partition("=")[0]
    return ("." not in key and key in shared_values(config)) or \
        key.split(".")[0] in {f.name for f in dataclasses.fields(cls)}


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file (optional), its directory's run.yaml and overrides, validating every key."""
    raw: dict = _read_mapping(Path(path)) if path is not None else {}
    shared = shared_values(path)
    sections = {f.name for f in dataclasses.fields(cls)}
    where = f"{path}: " if path is not None else ""
    if set(shared) & sections:
        raise ConfigError(f"{Path(path).parent / RUN_VARS}: {', '.join(sorted(set(shared) & sections))} is also a "
                          "config section; give shared values other names")
    for key, value in parse_overrides(overrides or []):
        if "." not in key and key in shared:
            shared[key] = value
        else:
            _set_dotted(raw, key, value)
    raw = _interpolate(raw, shared, where)
    try:
        cfg = _build(cls, raw)
        _validate_tree(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def get_dotted(cfg: Any, dotted: str) -> Any:
    """`get_dotted(cfg, "engine.output_dir")`; unknown keys raise ConfigError."""
    node = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"unknown key {dotted}")
        node = getattr(node, part)
    return node


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


# --- stage config sections ------------------------------------------------------------------


def check_loggers(report_to: list[str]) -> None:
    from train.engine.loggers import LOGGERS

    unknown = [name for name in report_to if name not in LOGGERS]
    if unknown or len(set(report_to)) != len(report_to):
        raise ConfigError(f"engine.report_to: {report_to} must list distinct loggers out of {', '.join(LOGGERS)}")


@dataclasses.dataclass
class ModelConfig:
    """The base model: a local Hugging Face directory, or a hub id read from the local HF cache (never fetched)."""

    path: str = ""  # local HF model dir (config.json + safetensors), or a hub id org/name[@revision] in the HF cache
    tokenizer: str = ""  # tokenizer dir or hub id; empty means `path`
    # eager keeps an [L x L] attention matrix per head and layer for backward (tdg plan counts it)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: flash-attn, else sdpa
    trust_remote_code: bool = False  # run model code shipped in the model dir (off unless you trust it)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    # the [targets x vocab] fp32 logits then never exist at once (sft, neg, nat, dpo, redi; ZeRO-0/1/2)
    loss_chunk_tokens: int = 0  # > 0: LM head and loss over this many target positions at a time; 0: all at once

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("model.path: required (a local Hugging Face model directory or a cached hub id)")


@dataclasses.dataclass
class LoraConfig:
    r: int = 8  # LoRA rank (the paper: 8)
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / r (the paper: 16)
    dropout: float = 0.05  # dropout on the LoRA input while training (the paper: 0.05)
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])  # layer names

    def validate(self) -> None:
        if self.r < 1 or not self.target_modules:
            raise ConfigError("lora: r must be >= 1 and target_modules non-empty")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (the paper: 3e-4)
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_steps: int = 200  # linear warmup, in optimizer steps (the paper: 200)
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    decay: Literal["cosine", "linear"] = "cosine"  # after warmup: cosine, or linear (REDI's and TRL's default)
    epochs: int = 1  # passes over the data (the paper: 20)
    max_steps: int = 0  # > 0 stops after this many optimizer steps (over all epochs)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    grad_accum: int = 1  # micro-batches per rank per optimizer step
    # the same recipe on any number of GPUs: grad_accum is derived so that ranks x grad_accum x data.max_tokens
    # equals this token budget per optimizer step (padding counts, as in data.max_tokens)
    global_batch_tokens: int = 0  # > 0: tokens per optimizer step over all ranks, grad_accum derived from it

    def validate(self) -> None:
        if self.grad_accum < 1 or self.epochs < 1 or self.lr <= 0:
            raise ConfigError("optim: grad_accum and epochs must be >= 1, lr > 0")
        if self.global_batch_tokens < 0:
            raise ConfigError("optim.global_batch_tokens: must be >= 0 (0: use optim.grad_accum as given)")
        if self.global_batch_tokens > 0 and self.grad_accum != 1:
            raise ConfigError(f"optim: set global_batch_tokens ({self.global_batch_tokens}) or grad_accum "
                              f"({self.grad_accum}), not both: grad_accum is derived from global_batch_tokens")


@dataclasses.dataclass
class EngineConfig:
    """The DeepSpeed loop: where it writes, how often it checkpoints and logs."""

    output_dir: str = ""  # where this stage writes: results, config.yaml, tb/, checkpoints/, DONE.json
    ds_config: str = "zero2"  # a name in ds_configs/ (zero2, zero3, zero3_offload) or a JSON path
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (bf16 runs on CPU too)
    dist_timeout_minutes: float = 60  # how long a collective waits (a rank saving or converting) before failing
    seed: int = 0  # seeds LoRA init and dropout (re-seeded per step: resume is exact)
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end / on a stop signal)
    keep_last: int = 2  # complete checkpoints kept; older ones deleted after a new one is complete
    log_every: int = 1  # TensorBoard scalars every N optimizer steps
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look the GPU up (none on CPU)
    progress: bool = True  # rank 0: a tqdm bar on a terminal, a plain line every 30 s in a log file
    resume_changed_config: bool = False  # resume a checkpoint trained under another config (DONE.json records both)
    # where scalars go, each getting the same ones: tensorboard (tb/), wandb, mlflow (optional extras, set up from
    # their environment variables: WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME)
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("engine.output_dir: required")
        if self.dist_timeout_minutes <= 0:
            raise ConfigError("engine.dist_timeout_minutes: must be > 0")
        if self.keep_last < 1:
            raise ConfigError("engine.keep_last: must be >= 1")
        check_loggers(self.report_to)


@dataclasses.dataclass
class TrainStageConfig:
    """Sections every training stage shares."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def validate(self) -> None:
        if self.data.max_len > self.data.max_tokens:
            raise ConfigError(f"data.max_len ({self.data.max_len}) must be <= data.max_tokens "
                              f"({self.data.max_tokens}): a batch must hold the longest sample")

    def require_padded_batches(self, why: str) -> None:
        """For stages whose loss reads whole sequences one per row (pairs, a score per sequence)."""
        if self.data.packing:
            raise ConfigError(f"data.packing: {why}; use padded batches")


@dataclasses.dataclass
class NegConfig(TrainStageConfig):
    """Stage `neg`: a LoRA adapter trained on the NEGATIVE rationales."""


@dataclasses.dataclass
class SftSection:
    labels: list[str] = dataclasses.field(default_factory=lambda: ["pos"])  # which rationales: pos, neg or both
    full: bool = False  # full fine-tune (writes a model dir) instead of a LoRA adapter
    unlikelihood: float = 0.0  # > 0: CE on positives + this weight x unlikelihood -log(1 - p) on negatives

    def validate(self) -> None:
        if not self.labels or set(self.labels) - {"pos", "neg"}:
            raise ConfigError(f"sft.labels: a non-empty subset of [pos, neg], got {self.labels}")
        if self.unlikelihood < 0 or (self.unlikelihood > 0 and set(self.labels) != {"pos", "neg"}):
            raise ConfigError("sft.unlikelihood: must be >= 0, and > 0 needs sft.labels=[pos, neg]")


@dataclasses.dataclass
class SftConfig(TrainStageConfig):
    """Stage `sft`: plain causal-LM fine-tuning (LoRA or full) on chosen rationales."""

    sft: SftSection = dataclasses.field(default_factory=SftSection)


@dataclasses.dataclass
class DpoSection:
    beta: float = 0.1  # strength of the implicit KL to the reference (TRL's default)
    pairs_per_question: int = 0  # cap on (pos, neg) pairs per question; 0: max(#pos, #neg), every rationale used
    seed: int = 0  # seeds the pairing
    disable_dropout: bool = True  # every dropout off (TRL's DPOTrainer default): policy and reference see one model

    def validate(self) -> None:
        if self.beta <= 0 or self.pairs_per_question < 0:
            raise ConfigError(f"dpo: beta > 0 and pairs_per_question >= 0 required, got {self.beta}, "
                              f"{self.pairs_per_question}")


@dataclasses.dataclass
class DpoConfig(TrainStageConfig):
    """Stage `dpo`: a LoRA trained with DPO on (pos, neg) pairs; the reference is model.path (adapter off)."""

    dpo: DpoSection = dataclasses.field(default_factory=DpoSection)

    def validate(self) -> None:
        super().validate()
        self.require_padded_batches("dpo compares whole sequences of a pair")
        if self.data.heldout_fraction > 0:
            raise ConfigError("data.heldout_fraction: not available in stage dpo yet (it trains on pairs); "
                              "the sft, neg, nat, distill and redi stages have it")


@dataclasses.dataclass
class RediSection:
    alpha: float = 0.8  # weight of the negative term, < 1 for stability (the REDI paper's recommended 0.8)
    unit: Literal["pair", "sample"] = "pair"  # pair: (pos, neg) pairs, averaged (the authors); sample: each alone
    pairs_per_question: int = 1  # unit pair: pairs drawn per question (the paper: 1); 0: max(#pos, #neg)
    seed: int = 0  # unit pair: seeds which rationales are paired

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"redi.alpha: between 0 and 1 (the paper recommends 0.8), got {self.alpha}")
        if self.pairs_per_question < 0:
            raise ConfigError(f"redi.pairs_per_question: >= 0 (0: every rationale paired), got "
                              f"{self.pairs_per_question}")


@dataclasses.dataclass
class RediConfig(TrainStageConfig):
    """Stage `redi`: a LoRA trained with the REDI objective on positives and negatives (reference-free)."""

    redi: RediSection = dataclasses.field(default_factory=RediSection)

    def validate(self) -> None:
        super().validate()
        if self.redi.unit == "pair":
            self.require_padded_batches("redi.unit=pair compares whole sequences of a pair")
            if self.data.heldout_fraction > 0:
                raise ConfigError("data.heldout_fraction: not available with redi.unit=pair (it trains on pairs); "
                                  "use redi.unit=sample")


@dataclasses.dataclass
class NatSection:
    neg_adapter: str = ""  # output dir of stage neg (its `adapter/` is used)
    gate_dim: int = 128  # width of the gate's Q, K and of V's bottleneck (the paper: 128)
    beta: float = 0.5  # alpha = 2*beta*a_neg - beta lies in [-beta, beta] (the paper: 0.5)
    temperature: float = 1.0  # softmax temperature of the gate (the paper: 1)

    def validate(self) -> None:
        if not self.neg_adapter:
            raise ConfigError("nat.neg_adapter: required (the output directory of stage neg)")
        if self.gate_dim < 1 or self.temperature <= 0 or not 0 < self.beta <= 1:
            raise ConfigError("nat: gate_dim >= 1, temperature > 0 and 0 < beta <= 1 required")


@dataclasses.dataclass
class NatConfig(TrainStageConfig):
    """Stage `nat`: a positive LoRA plus the attention gate over the frozen neg adapter."""

    nat: NatSection = dataclasses.field(default_factory=NatSection)


@dataclasses.dataclass
class ScoreSection:
    nat_dir: str = ""  # output directory of stage nat (the teacher)
    top_k: int = 32  # teacher log-probs kept per rationale token
    shard_size: int = 256  # samples per output shard (the unit of resume and of work per rank)
    logprob_dtype: Literal["float16", "bfloat16", "float32"] = "float16"  # storage type of the top-k log-probs
    restart: bool = False  # shards of another recipe in engine.output_dir (tdg score --restart): delete, score anew

    def validate(self) -> None:
        if not self.nat_dir:
            raise ConfigError("score.nat_dir: required (the output directory of stage nat)")
        if self.top_k < 1 or self.shard_size < 1:
            raise ConfigError("score: top_k and shard_size must be >= 1")


@dataclasses.dataclass
class ScoreEngine:
    output_dir: str = ""  # where shards/, manifest.json and DONE.json go
    ds_config: str = "none"  # none: a full teacher copy per rank; zero3: the teacher sharded over ranks
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (bf16 runs on CPU too)
    dist_timeout_minutes: float = 60  # how long a collective waits (a rank saving or converting) before failing
    progress: bool = True  # rank 0: a tqdm bar on a terminal, a plain line every 30 s in a log file

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("engine.output_dir: required")
        if self.dist_timeout_minutes <= 0:
            raise ConfigError("engine.dist_timeout_minutes: must be > 0")


@dataclasses.dataclass
class ScoreConfig:
    """Stage `score`: NCE weights (beta) and the NAT teacher's top-k log-probs, once, sharded."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    score: ScoreSection = dataclasses.field(default_factory=ScoreSection)
    engine: ScoreEngine = dataclasses.field(default_factory=ScoreEngine)


@dataclasses.dataclass
class DistillSection:
    scores: str = ""  # output dir of stage score (offline mode)
    nat_dir: str = ""  # output dir of stage nat (online mode runs this teacher in-process)
    mode: Literal["offline", "online"] = "offline"  # offline: stored top-k; online: teacher forward per step
    lam: float = 0.5  # loss = (1 - lam) * CE + lam * (0.5 + beta) * KD (the paper: 0.5)
    temperature: float = 1.0  # KD temperature (the paper: 1; exact for stored top-k only at 1)
    fixed_beta: float | None = None  # every sample gets this beta instead of its score (0.5: plain KD)
    top_k: int = 0  # online mode: KD over the teacher's top k + tail (0: the full vocabulary)
    full: bool = False  # full fine-tune of the student instead of LoRA

    def validate(self) -> None:
        if self.mode == "offline" and not self.scores:
            raise ConfigError("distill.scores: required in offline mode (the output directory of stage score)")
        if self.mode == "online" and not self.nat_dir:
            raise ConfigError("distill.nat_dir: required in online mode (the output directory of stage nat)")
        if not 0 <= self.lam <= 1 or self.temperature <= 0:
            raise ConfigError("distill: 0 <= lam <= 1 and temperature > 0 required")


@dataclasses.dataclass
class DistillConfig(TrainStageConfig):
    """Stage `distill`: the NCE student, trained on positives with beta-weighted KD from the NAT teacher."""

    distill: DistillSection = dataclasses.field(default_factory=DistillSection)


@dataclasses.dataclass
class RankerSection:
    # pointwise: (1 - s_pos)^3 + s_neg^3 with s = sigmoid(r), as the reference, so s is an absolute score;
    # pairwise: -log sigmoid(r_pos - r_neg) (Bradley-Terry), which leaves an arbitrary offset per question
    loss: Literal["pointwise", "pairwise"] = "pointwise"  # pointwise (the reference; calibrated s) or pairwise
    heldout_fraction: float = 0.1  # share of questions kept out of training for pairwise accuracy
    pairs_per_question: int = 0  # cap on (pos, neg) pairs per question; 0: max(#pos, #neg), every rationale used
    seed: int = 0  # seeds the pairing and the held-out split

    def validate(self) -> None:
        if not 0 <= self.heldout_fraction < 1 or self.pairs_per_question < 0:
            raise ConfigError("ranker: 0 <= heldout_fraction < 1 and pairs_per_question >= 0 required")


@dataclasses.dataclass
class RankerConfig(TrainStageConfig):
    """Stage `ranker`: a scalar reward head (LoRA body) trained so r(pos) > r(neg) on the same question."""

    ranker: RankerSection = dataclasses.field(default_factory=RankerSection)

    def validate(self) -> None:
        super().validate()
        self.require_padded_batches("the ranker reads one score per sequence")
        if self.data.heldout_fraction > 0:
            raise ConfigError("data.heldout_fraction: the ranker holds questions out with ranker.heldout_fraction")


@dataclasses.dataclass
class ServerSection:
    """An OpenAI-compatible server (vLLM's, SGLang, TGI, a commercial API) that generates for sample or eval."""

    base_url: str = ""  # e.g. http://node:8000/v1 (empty with backend openai: the client's default, api.openai.com)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never the key itself)
    concurrency: int = 8  # requests in flight
    max_retries: int = 5  # retries of a request after 429/5xx/timeout/malformed before giving up on it
    timeout: float = 120.0  # seconds one request may take
    backoff: float = 1.0  # first retry delay in seconds, doubled per retry (with jitter)

    def validate(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ConfigError("server: concurrency >= 1, max_retries >= 0, timeout > 0, backoff >= 0 required")


@dataclasses.dataclass
class VllmSection:
    """vLLM in-process (backend vllm; a plain model dir: an export or merged student)."""

    tensor_parallel_size: int = 1  # GPUs one model is split over (a teacher larger than one GPU)
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM may take (weights + KV cache)

    def validate(self) -> None:
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("vllm: tensor_parallel_size >= 1 and 0 < gpu_memory_utilization <= 1 required")


@dataclasses.dataclass
class EvalSection:
    model: str = ""  # model to evaluate: a model dir or cached hub id, or a stage output (adapter/, model/, NAT)
    test: str = ""  # test questions: MATH-style or question/answer jsonl/json/parquet/datasets dir, or a TDG dir
    fields: str = ""  # the test file's field names, OURS=THEIRS: question=prompt,gold=final_answer
    ranker: str = ""  # output dir of stage ranker; empty: no ASC (greedy and self-consistency only)
    n: int = 16  # sampled rationales per question (the paper: 16); 0: greedy only (no SC, ASC or pass@n)
    temperature: float = 0.5  # sampling temperature (the paper sampled at 0.5)
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 256  # generation cutoff per rationale
    batch_questions: int = 8  # questions per batch (1 greedy + n sampled sequences each)
    # the KV cache one generate call may hold, in tokens (prompt + new, summed over its sequences): the greedy
    # and question x n sampled sequences are split into calls that fit; 0 derives it from free device memory
    max_batch_tokens: int = 0  # tokens in flight per generate call; 0: half the free device memory (after loading)
    weighting: Literal["count", "score", "1+score", "1+2score"] = "score"  # ASC vote weight (all are reported)
    grader: Literal["math-verify", "hendrycks"] = "math-verify"  # answer equivalence, as in prepare
    grade_timeout: float = 5.0  # seconds one answer may take to grade
    max_questions: int = 0  # > 0: only the first N test questions
    seed: int = 0  # sampling seed (per question: reruns and resumes draw the same samples)
    prompt_template: str = ""  # empty: the template the model was trained with (its config.yaml or tdg.json)
    # a served model (backend openai) records no prompt: say how it was trained (hf: taken from the model)
    prompt_format: Literal["", "plain", "chat"] = ""  # empty: the model's recorded format, else plain
    system_prompt: str = ""  # chat: the system message (empty: the model's recorded one)
    # auto: openai when eval.server.base_url is set, else vllm when it imports and a GPU is here (a model dir),
    # else hf (any stage output: LoRA, NAT teacher)
    backend: Literal["auto", "hf", "vllm", "openai"] = "auto"  # generation backend (see train/backends.py)
    server: ServerSection = dataclasses.field(default_factory=ServerSection)  # backend openai: where and how
    vllm: VllmSection = dataclasses.field(default_factory=VllmSection)  # backend vllm: GPUs per model

    def validate(self) -> None:
        if not self.model or not self.test:
            raise ConfigError("eval.model and eval.test: required")
        if self.n < 0 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.batch_questions < 1:
            raise ConfigError("eval: n >= 0 (0: greedy only), temperature > 0, 0 < top_p <= 1, batch_questions >= 1 "
                              "required")
        if self.prompt_template:
            check_template(self.prompt_template, "eval.prompt_template")
        if self.max_batch_tokens < 0:
            raise ConfigError("eval.max_batch_tokens: must be >= 0 (0: derived from free device memory)")


@dataclasses.dataclass
class EvalEngine:
    output_dir: str = ""  # predictions*.jsonl, metrics.json, metrics.md, tb/, DONE.json
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (bf16 runs on CPU too)
    dist_timeout_minutes: float = 60  # how long a collective waits (a rank saving or converting) before failing
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # as model.attn_implementation
    progress: bool = True  # rank 0: a tqdm bar on a terminal, a plain line every 30 s in a log file
    report_to: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, mlflow

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("engine.output_dir: required")
        if self.dist_timeout_minutes <= 0:
            raise ConfigError("engine.dist_timeout_minutes: must be > 0")
        check_loggers(self.report_to)


@dataclasses.dataclass
class EvalConfig:
    """Stage `eval`: greedy, self-consistency and ranker-weighted (ASC) accuracy on test questions."""

    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    engine: EvalEngine = dataclasses.field(default_factory=EvalEngine)


@dataclasses.dataclass
class SampleSection:
    # hf: a model dir, cached hub id or stage output; openai: the model name the server serves
    model: str = ""  # the teacher to sample from
    questions: str = ""  # questions: every format eval's test reader takes (jsonl/json/parquet/datasets dir/TDG dir)
    fields: str = ""  # the questions file's field names, OURS=THEIRS: question=prompt,gold=final_answer
    n: int = 8  # rationales per question (the paper's data: 8)
    temperature: float = 0.5  # sampling temperature
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 512  # generation cutoff per rationale
    # auto: openai when sample.server.base_url is set, else vllm when it imports and a GPU is here (a model
    # dir), else hf (any stage output: LoRA, NAT teacher)
    backend: Literal["auto", "hf", "vllm", "openai"] = "auto"  # generation backend (see train/backends.py)
    server: ServerSection = dataclasses.field(default_factory=ServerSection)  # backend openai: where and how
    vllm: VllmSection = dataclasses.field(default_factory=VllmSection)  # backend vllm: GPUs per model
    batch_questions: int = 8  # questions per batch (hf: per generate call; openai: per fsync of the output)
    max_batch_tokens: int = 0  # hf: KV cache tokens per generate call; 0: half the free device memory
    max_questions: int = 0  # > 0: only the first N questions
    seed: int = 0  # sampling seed (per question: reruns draw the same samples where the backend honours it)
    prompt_template: str = ""  # empty: the model's recorded prompt (hf), else the default template
    prompt_format: Literal["", "plain", "chat"] = ""  # empty: the model's recorded format (hf), else plain
    system_prompt: str = ""  # chat: the system message
    # false: questions still failing after every retry go to failures.json, the rest to rationales.jsonl, exit 3
    require_all: bool = False  # true: any question failing after every retry is an error (exit 2)

    def validate(self) -> None:
        if not self.model or not self.questions:
            raise ConfigError("sample.model and sample.questions: required")
        if self.n < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.batch_questions < 1:
            raise ConfigError("sample: n >= 1, temperature > 0, 0 < top_p <= 1, batch_questions >= 1 required")
        if self.prompt_template:
            check_template(self.prompt_template, "sample.prompt_template")


@dataclasses.dataclass
class SampleEngine:
    output_dir: str = ""  # rationales.jsonl (prepare's flat layout), DONE.json; part-rank<r>.jsonl.part while running
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # hf: auto is bf16 on GPU, fp32 on CPU
    dist_timeout_minutes: float = 60  # how long a collective waits before failing
    progress: bool = True  # rank 0: a tqdm bar on a terminal (questions/s, ETA), a plain line every 30 s in a log

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("engine.output_dir: required")


@dataclasses.dataclass
class SampleConfig:
    """`tdg sample`: n rationales per question from a teacher, right and wrong, in the layout prepare reads."""

    sample: SampleSection = dataclasses.field(default_factory=SampleSection)
    engine: SampleEngine = dataclasses.field(default_factory=SampleEngine)


ABLATION_VARIANTS = ["base", "sft-pos", "sft-mix", "neg-then-pos", "ul", "dpo", "redi", "nat", "kd", "nat+nce"]


@dataclasses.dataclass
class AblationSection:
    configs: str = "configs/tiny"  # stage configs dir: sft (the sft baselines), neg, nat, score, distill, eval .yaml
    variants: list[str] = dataclasses.field(default_factory=lambda: list(ABLATION_VARIANTS))  # which to run
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])  # one full run per seed
    base_model: str = ""  # base model dir every student and teacher starts from
    data: str = ""  # prepared data dir (tdg prepare)
    test: str = ""  # held-out test questions (as for stage eval)
    ranker: str = ""  # stage-ranker output for ASC; empty: greedy and self-consistency only
    unlikelihood: float = 1.0  # weight of the unlikelihood term in variant ul
    nproc: int = 2  # processes per stage launch (torchrun on this node)
    train_overrides: list[str] = dataclasses.field(default_factory=list)  # key=value for every training stage
    eval_overrides: list[str] = dataclasses.field(default_factory=list)  # key=value for every eval

    def validate(self) -> None:
        unknown = set(self.variants) - set(ABLATION_VARIANTS)
        if unknown or not self.variants:
            raise ConfigError(f"ablation.variants: unknown {sorted(unknown)}; choose from {ABLATION_VARIANTS}")
        if not self.seeds or not self.base_model or not self.data or not self.test:
            raise ConfigError("ablation: seeds, base_model, data and test are required")


@dataclasses.dataclass
class AblationEngine:
    output_dir: str = ""  # seed<s>/<stage or variant>/, results.json, results.md, ablation.png

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("engine.output_dir: required")


@dataclasses.dataclass
class AblationConfig:
    """`tdg ablation`: train and evaluate every variant on the same data, per seed; mean and std table."""

    ablation: AblationSection = dataclasses.field(default_factory=AblationSection)
    engine: AblationEngine = dataclasses.field(default_factory=AblationEngine)


# Every numeric setting's range, checked as the config is read (file, run.yaml and overrides), the key named.
# Defaults are inside their ranges; float settings are also refused when NaN or infinite.
POSITIVE, NON_NEGATIVE, AT_LEAST_1, SHARE = "(0, inf)", "[0, inf)", "[1, inf)", "[0, 1]"
RANGES: dict[type, dict[str, str]] = {
    DataConfig: {"max_len": "[2, inf)", "max_tokens": AT_LEAST_1, "group_size": AT_LEAST_1,
                 "heldout_fraction": "[0, 1)"},
    ModelConfig: {"loss_chunk_tokens": NON_NEGATIVE},
    LoraConfig: {"r": AT_LEAST_1, "alpha": POSITIVE, "dropout": "[0, 1)"},
    OptimConfig: {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "betas": "[0, 1)", "warmup_steps": NON_NEGATIVE,
                  "min_lr_ratio": SHARE, "epochs": AT_LEAST_1, "max_steps": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
                  "grad_accum": AT_LEAST_1, "global_batch_tokens": NON_NEGATIVE},
    EngineConfig: {"dist_timeout_minutes": POSITIVE, "save_every": NON_NEGATIVE, "keep_last": AT_LEAST_1,
                   "log_every": AT_LEAST_1, "peak_tflops": NON_NEGATIVE},
    SftSection: {"unlikelihood": NON_NEGATIVE},
    DpoSection: {"beta": POSITIVE, "pairs_per_question": NON_NEGATIVE},
    RediSection: {"alpha": SHARE, "pairs_per_question": NON_NEGATIVE},
    NatSection: {"gate_dim": AT_LEAST_1, "beta": NON_NEGATIVE, "temperature": POSITIVE},
    ScoreSection: {"top_k": AT_LEAST_1, "shard_size": AT_LEAST_1},
    ScoreEngine: {"dist_timeout_minutes": POSITIVE},
    DistillSection: {"lam": SHARE, "temperature": POSITIVE, "fixed_beta": SHARE, "top_k": NON_NEGATIVE},
    RankerSection: {"heldout_fraction": "[0, 1)", "pairs_per_question": NON_NEGATIVE},
    ServerSection: {"concurrency": AT_LEAST_1, "max_retries": NON_NEGATIVE, "timeout": POSITIVE,
                    "backoff": NON_NEGATIVE},
    VllmSection: {"tensor_parallel_size": AT_LEAST_1, "gpu_memory_utilization": "(0, 1]"},
    EvalSection: {"n": NON_NEGATIVE, "temperature": POSITIVE, "top_p": "(0, 1]", "max_new_tokens": AT_LEAST_1,
                  "batch_questions": AT_LEAST_1, "max_batch_tokens": NON_NEGATIVE, "grade_timeout": POSITIVE,
                  "max_questions": NON_NEGATIVE},
    EvalEngine: {"dist_timeout_minutes": POSITIVE},
    SampleSection: {"n": AT_LEAST_1, "temperature": POSITIVE, "top_p": "(0, 1]", "max_new_tokens": AT_LEAST_1,
                    "batch_questions": AT_LEAST_1, "max_batch_tokens": NON_NEGATIVE, "max_questions": NON_NEGATIVE},
    SampleEngine: {"dist_timeout_minutes": POSITIVE},
    AblationSection: {"unlikelihood": NON_NEGATIVE, "nproc": AT_LEAST_1},
}
