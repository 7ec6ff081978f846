"""`tdg plan`: what a stage will need per GPU, before it waits in a queue: memory (weights, trainable
states, activations, logits, eval's KV cache, online distill's teacher copy and chunked logits), the global
batch, steps per epoch and communication per optimizer step. It exits non-zero, naming the reason, when a
job will not fit.

Sizes come from the model's config.json, or from a known public shape when the path is a name like
`/models/llama-2-70b` that does not exist here (PRESETS). The trainable states use DeepSpeed's own
estimators (`estimate_zero2/3_model_states_mem_needs`, which count every trainable parameter); frozen
weights, activations and logits are counted here:
    activations, bf16, per token and layer: 2 x (8 h + 2 kv + 4 i) bytes (the inputs of each linear
      layer and nonlinearity kept for backward, flash/SDPA attention), h hidden, kv key/value width,
      i MLP width; with gradient checkpointing 2 h per layer plus one layer recomputed; eager attention
      adds 4 x heads x max_len per token and layer (scores and probabilities)
    logits: 10 bytes per vocabulary entry per token (bf16 logits, fp32 loss and gradient), 14 for distill
      (the student's fp32 log-softmax for KD), none for the ranker (a scalar head); the head runs at target
      positions only, counted as every token (a micro-batch may be all targets), or one chunk of
      model.loss_chunk_tokens positions at a time
    gradient buckets: DeepSpeed's reduction buffers, reduce_bucket_size 16-bit elements (twice under ZeRO-1/2
      with overlap_comm), allocated whole whatever the trainable size
    communication: ZeRO-3 all-gathers every weight twice per micro-batch; ZeRO-2 reduces the trainable
      gradients per micro-batch and gathers the updated ones per step
A GPU keeps CONTEXT_GIB free for the CUDA context, NCCL buffers and allocator slack.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from train.errors import ConfigError

GIB = 2**30
CONTEXT_GIB = 2.0
FILL = 0.9  # share of a length-grouped micro-batch's token budget that real tokens fill (bench/token_lengths.py)


@dataclass(frozen=True)
class Shape:
    """A decoder-only (Llama-family) model's sizes."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by module name."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linear_dims().values()) + 2 * self.hidden

    def params(self, lm_head: bool = True) -> int:
        """Every parameter; with lm_head=False the ranker's body (its scalar head replaces the LM head)."""
        head = self.vocab * self.hidden if lm_head and not self.tied else 0
        return self.layers * self.layer_params() + self.vocab * self.hidden + head + self.hidden

    def largest_layer_params(self) -> int:
        return max(self.layer_params(), self.vocab * self.hidden)

    def activation_bytes(self, checkpointing: bool, eager_len: int = 0) -> int:
        """Bytes one token keeps for backward over all layers (bf16). Eager attention (`eager_len` > 0, the
        longest sequence) also keeps each head's row of attention scores and probabilities: 4 x heads x L."""
        one_layer = 2 * (8 * self.hidden + 2 * self.kv_dim + 4 * self.intermediate) + 4 * self.heads * eager_len
        if checkpointing:
            return self.layers * 2 * self.hidden + one_layer
        return self.layers * one_layer

    def kv_cache_bytes(self, bytes_per_value: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * bytes_per_value


_LLAMA_7B = Shape(32000, 4096, 32, 32, 32, 11008)
_LLAMA_13B = Shape(32000, 5120, 40, 40, 40, 13824)
PRESETS = {"llama-7b": _LLAMA_7B, "llama-2-7b": _LLAMA_7B, "llama-13b": _LLAMA_13B, "llama-2-13b": _LLAMA_13B,
           "llama-2-70b": Shape(32000, 8192, 80, 64, 8, 28672), "mistral-7b": Shape(32000, 4096, 32, 32, 8, 14336)}


def shape_of(model: str) -> tuple[Shape, str]:
    """(shape, where it came from) for a model dir with config.json, a config.json path, or a preset name
    (also the last part of a path or hub id that is not here, e.g. /models/llama-2-70b or
    mistralai/Mistral-7B-Instruct-v0.2: mistral-7b). A hub id in the local HF cache is read from its snapshot."""
    from train.models.hub import is_hub_id, resolve_model_ref

    not_cached = ""
    if is_hub_id(model):
        try:
            model = resolve_model_ref(model, "model.path")
        except ConfigError:  # not cached on this (login) node: its name may still give the shape
            from huggingface_hub import constants

            not_cached = (f" (a hub id, not in the Hugging Face cache {constants.HF_HUB_CACHE} here: set HF_HOME to "
                          "the cache the cluster shares, or download it there)")
    p = Path(model)
    cfg_file = p if p.name == "config.json" else p / "config.json"
    if cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        heads = c["num_attention_heads"]
        return Shape(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], heads,
                     c.get("num_key_value_heads") or heads, c["intermediate_size"],
                     bool(c.get("tie_word_embeddings", False))), str(cfg_file)
    name = p.name.lower().partition("@")[0]
    for preset in sorted(PRESETS, key=len, reverse=True):  # llama-2-7b-chat-hf: llama-2-7b
        if name == preset or name.startswith(preset + "-"):
            return PRESETS[preset], f"preset {preset}"
    raise ConfigError(f"{model}: no config.json there and not a known shape{not_cached}; pass --model-config "
                      f"(slurm/pipeline.sh --model-config, or TDG_MODEL_CONFIG) with a config.json or one of "
                      f"{', '.join(sorted(PRESETS))}")


def _base_of(output_dir: str) -> str | None:
    """The base model path behind a stage output or export dir, if it exists here."""
    d = Path(output_dir)
    if (d / "config.json").is_file():
        return str(d)
    for f, key in ((d / "adapter" / "adapter_config.json", "base_model_name_or_path"), (d / "nat.json", "base_model"),
                   (d / "ranker.json", "base_model")):
        if f.is_file():
            return json.loads(f.read_text())[key]
    if (d / "model" / "config.json").is_file():
        return str(d / "model")
    return None


def _sibling_model(config_file: str | None, stage_file: str, overrides: tuple[str, ...] = ()) -> str | None:
    """model.path of another stage config beside this one (the pipeline's directory), if there is one, resolved
    as the pipeline will run it (run.yaml shared values and the overrides that are for it)."""
    if config_file is None:
        return None
    sibling = Path(config_file).with_name(stage_file)
    if not sibling.is_file():
        return None
    from train.config import is_override_for, load_config
    from train.pipeline import config_class

    cls = config_class(sibling.stem)  # sft, nat, distill or ranker: the file is named by its stage
    try:
        return load_config(cls, sibling, [o for o in overrides if is_override_for(cls, sibling, o)]).model.path
    except ConfigError:
        return None


@dataclass
class Plan:
    stage: str
    world: int
    gpu_mem_gib: float
    header: str = ""
    memory: list[tuple[str, float]] = field(default_factory=list)  # (what, bytes per GPU)
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what would fail at launch whatever the memory

    @property
    def total(self) -> float:
        return sum(b for _, b in self.memory)

    @property
    def fits(self) -> bool:
        return self.total / GIB + CONTEXT_GIB <= self.gpu_mem_gib

    @property
    def ok(self) -> bool:
        return self.fits and not self.problems

    def render(self) -> str:
        lines = [f"[plan] {self.stage}: {self.header}"]
        width = max([72, *(len(what) for what, _ in self.memory)])
        lines += [f"  {what:<{width}} {b / GIB:8.2f} GiB" for what, b in self.memory]
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'total per GPU (+ ' + str(CONTEXT_GIB) + ' GiB context)':<{width}} "
                     f"{self.total / GIB + CONTEXT_GIB:8.2f} GiB of {self.gpu_mem_gib:g}: {verdict}")
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  PROBLEM: {problem}" for problem in self.problems]
        if not self.fits:
            lines += [f"  try: {a}" for a in self.advice]
        return "\n".join(lines)


def _zero(ds_config: str) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offloaded to CPU) of an engine.ds_config; stage 0 for 'none'."""
    if ds_config == "none":
        return 0, False
    from train.engine.ds_config import resolve_path

    cfg = json.loads(resolve_path(ds_config).read_text())
    zero = cfg.get("zero_optimization", {})
    return int(zero.get("stage", 0)), "offload_optimizer" in zero


def _gradient_buckets(ds_config: str) -> tuple[int, str]:
    """(bytes, what) of DeepSpeed's gradient-reduction buffers. With contiguous gradients they are allocated
    whole, whatever the trainable size: reduce_bucket_size 16-bit elements, twice under ZeRO-1/2 with
    overlap_comm (double buffering, stage_1_and_2's setup_buckets), once under ZeRO-3 (stage3's ipg buffer).
    Defaults are DeepSpeed's own (DeepSpeedZeroConfig). LongLoRA's stage2.json (1e9, overlap_comm) makes them
    3.7 GiB per GPU, the term that put this plan 15% under its measured LoRA peak."""
    if ds_config == "none":
        return 0, ""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    from train.engine.ds_config import resolve_path

    path = resolve_path(ds_config)
    raw = json.loads(path.read_text()).get("zero_optimization", {})
    try:  # "auto" is filled at launch for batch keys only; here it stands for DeepSpeed's default
        zero = DeepSpeedZeroConfig(**{k: v for k, v in raw.items() if v != "auto"})
    except ValidationError as e:
        raise ConfigError(f"{path}: zero_optimization is not a valid DeepSpeed ZeRO config: {e}") from None
    stage = int(zero.stage)
    if stage == 0 or not zero.contiguous_gradients:
        return 0, ""
    copies = 2 if stage in (1, 2) and zero.overlap_comm else 1
    why = " (overlap_comm: double-buffered)" if copies == 2 else ""
    return 2 * copies * zero.reduce_bucket_size, (f"gradient buckets: {copies} x reduce_bucket_size "
                                                  f"{zero.reduce_bucket_size:,} (16-bit){why}")


def lora_params(shape: Shape, targets: list[str], r: int) -> int:
    dims = shape.linear_dims()
    return shape.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


def gate_params(shape: Shape, targets: list[str], gate_dim: int) -> int:
    """NAT gate per adapted layer: Q [g, in], K [g, out], V1 [g, out] + bias, V2 [out, g] + bias."""
    dims = shape.linear_dims()
    return shape.layers * sum(gate_dim * (i + 3 * o) + gate_dim + o for i, o in (dims[t] for t in targets if t in dims))


def _trainable_states(trainable: int, largest: int, zero: int, offload: bool, nodes: int, gpn: int) -> int:
    """GPU bytes for the trainable parameters' 16-bit copies, gradients and fp32 optimizer states, by DeepSpeed's
    own estimators (which count every trainable parameter)."""
    if zero == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(trainable, largest, gpn, nodes, cpu_offload=offload,
                                                     cpu_offload_params=False)[1] - 4 * largest
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs(trainable, gpn, nodes, cpu_offload=offload)[1]


def _steps_note(cfg, labels: tuple[str, ...], world: int, accum: int) -> str:
    """Global batch and (estimated from the prepared data's token lengths) steps per epoch."""
    batch = world * accum * cfg.data.max_tokens
    note = f"global batch {batch:,} tokens = {world} rank(s) x {accum} micro-batch(es) x {cfg.data.max_tokens:,}"
    stats_file = Path(cfg.data.path) / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    if stats is None or stats.get("length_unit") != "tokens":
        return note + "; steps per epoch unknown (needs the prepared data's token lengths: tdg prepare --tokenizer)"
    lengths = stats["subjects"]["ALL"]["lengths"]
    tokens = sum(lengths[label]["samples"] * lengths[label]["mean"] for label in labels if lengths[label]["samples"])
    steps = tokens / (FILL * batch)
    return note + f"; ~{steps:,.0f} optimizer steps per epoch over ~{tokens / 1e6:,.1f} M tokens"


def plan_training(stage: str, cfg, nodes: int, gpn: int, gpu_mem: float, model: str | None, config_file: str | None,
                  overrides: tuple[str, ...] = (), teacher_model: str | None = None) -> Plan:
    from train.engine.ds_config import effective_optim

    world = nodes * gpn
    path = model or cfg.model.path
    if stage in ("dpo", "redi") and not model and _base_of(path) is None:  # a merged sft model not exported yet
        path = _sibling_model(config_file, "sft.yaml", overrides) or path
    shape, source = shape_of(path)
    zero, offload = _zero(cfg.engine.ds_config)
    plan = Plan(stage, world, gpu_mem)
    full = (stage == "sft" and cfg.sft.full) or (stage == "distill" and cfg.distill.full)
    total = shape.params(lm_head=stage != "ranker")
    if full:
        trainable, what = total, "full fine-tune"
    else:
        trainable = lora_params(shape, cfg.lora.target_modules, cfg.lora.r)
        what = f"LoRA r {cfg.lora.r} on {', '.join(cfg.lora.target_modules)}"
        if stage == "nat":
            trainable += gate_params(shape, cfg.lora.target_modules, cfg.nat.gate_dim)
            what += f" + NAT gate {cfg.nat.gate_dim} (the frozen neg branch counted as weights)"
        if stage == "ranker":
            trainable += shape.hidden
            what += " + scalar head"
    frozen = 0 if full else total + (lora_params(shape, cfg.lora.target_modules, cfg.lora.r) if stage == "nat" else 0)
    offloaded = " (optimizer offloaded)" if offload else ""
    plan.header = (f"{nodes} node(s) x {gpn} GPU(s) of {gpu_mem:g} GiB, ZeRO-{zero}{offloaded}, bf16; {source}: "
                   f"{total / 1e9:.2f} B parameters, {trainable / 1e6:,.1f} M trainable ({what})")
    if zero == 3:
        plan.memory.append((f"frozen weights, partitioned over {world} GPUs", 2 * frozen / world))
        plan.memory.append(("one gathered layer in flight (2 x 16-bit, prefetch)", 4 * shape.largest_layer_params()))
    elif frozen:
        plan.memory.append(("frozen weights, whole on every GPU (bf16)", 2 * frozen))
    plan.memory.append(("trainable: 16-bit copy, grads, fp32 masters + Adam (DeepSpeed)",
                        _trainable_states(trainable, shape.largest_layer_params(), zero, offload, nodes, gpn)))
    buckets, buckets_what = _gradient_buckets(cfg.engine.ds_config)
    if buckets:
        plan.memory.append((buckets_what, buckets))
    tokens = cfg.data.max_tokens
    ckpt = cfg.model.gradient_checkpointing
    eager = cfg.data.max_len if cfg.model.attn_implementation == "eager" else 0
    kernel = "eager attention" if eager else "fused attention (sdpa/flash)"
    plan.memory.append((f"activations, {tokens:,} tokens, {'with' if ckpt else 'without'} gradient checkpointing, "
                        f"{kernel}", tokens * shape.activation_bytes(ckpt, eager)))
    chunk = cfg.model.loss_chunk_tokens if stage != "ranker" else 0
    per_entry = {"distill": 14, "ranker": 0}.get(stage, 10)  # bytes per logit (see the module docstring)
    if per_entry:
        rows = min(chunk, tokens) if chunk else tokens  # the head runs at target positions: at most every token
        what = f"{chunk:,}-position chunks (model.loss_chunk_tokens)" if chunk else f"{tokens:,} tokens"
        plan.memory.append((f"logits, {what} x {shape.vocab:,}", per_entry * rows * shape.vocab))
    if stage == "distill" and cfg.distill.mode == "online":
        from train.stages.score import SCORE_CHUNK

        teacher, teacher_source = shape_of(teacher_model or _base_of(cfg.distill.nat_dir) or model or cfg.model.path)
        plan.memory.append((f"online teacher: a whole copy ({teacher_source}); its nat and neg logits in "
                            f"{SCORE_CHUNK:,}-position chunks", 2 * teacher.params()
                            + 10 * min(SCORE_CHUNK, tokens) * teacher.vocab))
        if cfg.distill.top_k == 0:  # whole-vocabulary KD: the teacher's fp32 log-probs beside each student chunk
            plan.memory.append(("online teacher's fp32 log-probs in the student's chunks (distill.top_k 0)",
                                8 * rows * teacher.vocab))
    try:
        accum = effective_optim(cfg.optim, tokens, world).grad_accum
    except ConfigError as e:
        plan.problems.append(str(e))
        accum = cfg.optim.grad_accum
    if stage == "dpo":
        plan.notes.append("dpo: each step also runs a no-grad forward of every pair with the adapter off (the "
                          "reference): about 1.3 x the compute of sft per token")
    both = ("pos", "neg")
    labels = {"neg": ("neg",), "ranker": both, "dpo": both, "redi": both}.get(
        stage, tuple(getattr(getattr(cfg, "sft", None), "labels", ["pos"])))
    plan.notes.append(_steps_note(cfg, labels, world, accum))
    if zero == 3:
        comm = accum * (2 * 2 * total + 2 * trainable)
        how = "all-gather of every weight twice per micro-batch + gradient reduce-scatter"
    else:
        comm = accum * 2 * trainable + 2 * trainable
        how = "reduce-scatter of the trainable gradients per micro-batch + gather of the updated ones"
    plan.notes.append(f"communication ~{comm / 1e9:,.2f} GB per GPU per optimizer step ({how})")
    other = tokens * shape.activation_bytes(not ckpt, eager) / GIB
    plan.notes.append(f"activations {'without' if ckpt else 'with'} gradient checkpointing would be {other:.2f} GiB")
    if not ckpt:
        plan.advice.append("model.gradient_checkpointing=true (activations "
                           f"{tokens * shape.activation_bytes(False, eager) / GIB:.1f} -> "
                           f"{tokens * shape.activation_bytes(True, eager) / GIB:.1f} GiB)")
    if eager:
        plan.advice.append("model.attn_implementation=auto (fused attention: no [L x L] matrix per head)")
    plan.advice.append(f"a smaller data.max_tokens (now {tokens:,}; raise grad accumulation to keep the batch)")
    if zero != 3 and per_entry and not chunk and tokens > 1024:
        plan.advice.append(f"model.loss_chunk_tokens=1024 (logits {per_entry * tokens * shape.vocab / GIB:.1f} -> "
                           f"{per_entry * 1024 * shape.vocab / GIB:.1f} GiB)")
    if buckets > GIB:
        plan.advice.append(f"a ds_config with a smaller zero_optimization.reduce_bucket_size, or overlap_comm false "
                           f"(the gradient buckets take {buckets / GIB:.1f} GiB)")
    if zero != 3:
        plan.advice.append("engine.ds_config=zero3 (partitions the weights) or more GPUs")
    return plan


def plan_score(cfg, nodes: int, gpn: int, gpu_mem: float, model: str | None, config_file: str | None,
               overrides: tuple[str, ...] = ()) -> Plan:
    world = nodes * gpn
    base = model or _base_of(cfg.score.nat_dir) or _sibling_model(config_file, "nat.yaml", overrides)
    if base is None:
        raise ConfigError(f"score.nat_dir: {cfg.score.nat_dir} does not exist yet and no nat.yaml beside the config "
                          "names its base; pass --model-config (slurm/pipeline.sh: TDG_MODEL_CONFIG)")
    shape, source = shape_of(base)
    zero, _ = _zero(cfg.engine.ds_config)
    plan = Plan("score", world, gpu_mem)
    plan.header = (f"{nodes} node(s) x {gpn} GPU(s) of {gpu_mem:g} GiB, "
                   f"{'ZeRO-3 inference' if zero == 3 else 'a whole teacher per GPU'}, bf16; teacher {source}: "
                   f"{shape.params() / 1e9:.2f} B parameters")
    if zero == 3:
        plan.memory.append((f"teacher weights, partitioned over {world} GPUs", 2 * shape.params() / world))
        plan.memory.append(("one gathered layer in flight", 4 * shape.largest_layer_params()))
    else:
        plan.memory.append(("teacher weights, whole (bf16)", 2 * shape.params()))
    tokens = cfg.data.max_tokens
    plan.memory.append((f"one layer's activations, {tokens:,} tokens (no backward)",
                        tokens * shape.activation_bytes(False) // shape.layers))
    from train.stages.score import SCORE_CHUNK

    rows = tokens if zero == 3 else min(SCORE_CHUNK, tokens)  # a whole teacher scores chunks of targets
    what = f"{tokens:,} tokens" if rows == tokens else f"{rows:,}-position chunks"
    plan.memory.append((f"logits of the nat and neg passes, {what} x {shape.vocab:,}", 10 * rows * shape.vocab))
    plan.notes.append("communication: none between ranks" if zero != 3 else
                      f"communication ~{2 * 2 * shape.params() / 1e9:,.1f} GB per GPU per batch (the teacher gathered "
                      "for the nat and the neg pass)")
    plan.advice += [f"a smaller data.max_tokens (now {tokens:,})",
                    "engine.ds_config=zero3 (partitions the teacher)" if zero != 3 else "more GPUs"]
    return plan


def plan_eval(cfg, nodes: int, gpn: int, gpu_mem: float, model: str | None, config_file: str | None,
              overrides: tuple[str, ...] = ()) -> Plan:
    from train.generation import KV_FRACTION, kv_budget_tokens, rows_per_call

    world = nodes * gpn
    base = model or _base_of(cfg.eval.model) or _sibling_model(config_file, "distill.yaml", overrides)
    if base is None:
        raise ConfigError(f"eval.model: {cfg.eval.model} does not exist yet and no distill.yaml beside the config "
                          "names its base; pass --model-config (slurm/pipeline.sh: TDG_MODEL_CONFIG)")
    shape, source = shape_of(base)
    plan = Plan("eval", world, gpu_mem)
    plan.header = f"{nodes} node(s) x {gpn} GPU(s) of {gpu_mem:g} GiB, one copy per GPU, bf16; generator {source}"
    plan.memory.append(("generator weights (bf16)", 2 * shape.params()))
    if cfg.eval.ranker:
        ranker_base = _base_of(cfg.eval.ranker) or _sibling_model(config_file, "ranker.yaml", overrides) or base
        ranker, ranker_source = shape_of(model or ranker_base)
        plan.memory.append((f"ranker weights ({ranker_source}; a scalar head, no LM head)",
                            2 * (ranker.params(lm_head=False) + ranker.hidden)))
    per_token = shape.kv_cache_bytes()
    prompt = 256  # a long MATH prompt, rounded up
    seq = prompt + cfg.eval.max_new_tokens
    wanted = cfg.eval.batch_questions * cfg.eval.n * seq
    if cfg.eval.max_batch_tokens > 0:
        budget = cfg.eval.max_batch_tokens
        plan.memory.append((f"KV cache: eval.max_batch_tokens {budget:,} x {per_token / 2**20:.2f} MiB",
                            budget * per_token))
    else:
        # eval loads the ranker, then the generator, then takes its budget from what is free (the same rule)
        budget = kv_budget_tokens(gpu_mem * GIB - plan.total - CONTEXT_GIB * GIB, per_token)
        plan.memory.append((f"KV cache: {KV_FRACTION:g} of what is left, {budget:,} tokens "
                            "(eval.max_batch_tokens=0)", budget * per_token))
    rows = rows_per_call(budget, prompt, cfg.eval.max_new_tokens)
    plan.notes.append(f"a batch of {cfg.eval.batch_questions} questions x {cfg.eval.n} samples of up to {seq} tokens "
                      f"({wanted * per_token / GIB:.1f} GiB of KV cache at once) runs as "
                      f"{math.ceil(cfg.eval.batch_questions * cfg.eval.n / rows)} generate call(s) of {rows} sequences")
    plan.advice.append("a smaller eval.max_batch_tokens, or 0 to derive it from free memory")
    return plan


TRAINING_STAGES = ("sft", "neg", "nat", "distill", "ranker", "dpo", "redi")
PLANNED_STAGES = (*TRAINING_STAGES, "score", "eval")


def make_plan(stage: str, cfg, nodes: int, gpn: int, gpu_mem: float, model: str | None = None,
              config_file: str | None = None, overrides: tuple[str, ...] = ()) -> Plan:
    """`overrides`: the pipeline's, for reading the model of a sibling config (score: nat.yaml's base)."""
    if stage == "score":
        return plan_score(cfg, nodes, gpn, gpu_mem, model, config_file, overrides)
    if stage == "eval":
        return plan_eval(cfg, nodes, gpn, gpu_mem, model, config_file, overrides)
    if stage in TRAINING_STAGES:
        return plan_training(stage, cfg, nodes, gpn, gpu_mem, model, config_file, overrides)
    raise ConfigError(f"tdg plan: no plan for stage {stage!r}")
