"""The NAT layer: two LoRA branches (frozen neg, trained pos) mixed by a small attention gate.

For an adapted linear layer with base weight W and LoRA scale s (DESIGN.md):
    h_pos = W x + B_pos A_pos x s        h_neg = W x + B_neg A_neg x s
    q = Q x          k_i = K h_i          v_i = V2 gelu(V1 h_i)          (i in pos, neg)
    a = softmax_i(q . k_i / T)           alpha = 2 beta a_neg - beta     (in [-beta, beta])
    y = W x + (1 - alpha) v_pos + alpha v_neg
V2 starts at zero, so an untrained NAT model computes exactly W x (the base model). K and V1
act on layer outputs, so they are sized from out_features: k/v projections under grouped-query
attention have out_features != in_features (the reference implementation assumed equality).

Modes: `nat` (the above), `neg` (W x + B_neg A_neg x s: the negative teacher, as PEFT computes
it), `pos` (W x + B_pos A_pos x s), `base` (W x). Dropout applies to the pos branch only: the
neg branch is a frozen teacher.

On disk (stage nat output): `pos/` a PEFT adapter, `gate.safetensors`, and `nat.json` that
points at the base model and the neg adapter. `load_nat_teacher(dir, mode)` rebuilds it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from train.errors import ConfigError
from train.models.adapters import AdapterSaveError, peft_key_prefix

MODES = ("nat", "neg", "pos", "base")
NAT_JSON = "nat.json"
GATE_FILE = "gate.safetensors"


def _register_external(module: nn.Module, params: list[nn.Parameter]) -> None:
    """deepspeed.zero.register_external_parameter for each (a no-op outside ZeRO-3; skipped without DeepSpeed)."""
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:
        return
    for p in params:
        register_external_parameter(module, p)


class NATLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, gate_dim: int, beta: float,
                 temperature: float):
        super().__init__()
        self.base_layer = base
        in_f, out_f = base.in_features, base.out_features
        dtype, device = base.weight.dtype, base.weight.device
        self.scaling = alpha / r
        self.beta, self.temperature = beta, temperature
        self.mode = "nat"
        self.lora_A_neg = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B_neg = nn.Linear(r, out_f, bias=False, dtype=dtype, device=device)
        self.lora_A_pos = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B_pos = nn.Linear(r, out_f, bias=False, dtype=dtype, device=device)
        self.gate_q = nn.Linear(in_f, gate_dim, bias=False, dtype=dtype, device=device)
        self.gate_k = nn.Linear(out_f, gate_dim, bias=False, dtype=dtype, device=device)
        self.gate_v1 = nn.Linear(out_f, gate_dim, dtype=dtype, device=device)
        self.gate_v2 = nn.Linear(gate_dim, out_f, dtype=dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for a in (self.lora_A_neg, self.lora_A_pos):  # PEFT's LoRA init: A kaiming, B zero
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.lora_B_neg, self.lora_B_pos):
            nn.init.zeros_(b.weight)
        nn.init.zeros_(self.gate_v2.weight)
        nn.init.zeros_(self.gate_v2.bias)
        self.alpha_stats: torch.Tensor | None = None  # (mean, std) of alpha in the last nat forward
        # _gated reads these weights without calling their modules. Registered so that ZeRO-3 gathers them with
        # this module (recent DeepSpeed also detects such reads on the fly; this says it up front)
        _register_external(self, [self.gate_k.weight, self.gate_v1.weight, self.gate_v1.bias,
                                  self.lora_B_pos.weight, self.lora_B_neg.weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self.mode == "base":
            return base
        if self.mode == "neg":
            return base + self.lora_B_neg(self.lora_A_neg(x)) * self.scaling
        if self.mode == "pos":
            return base + self.lora_B_pos(self.lora_A_pos(self.dropout(x))) * self.scaling
        return base + self._gated(x, base)

    def _gated(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(1 - alpha) v_pos + alpha v_neg, without forming the full-width h_pos and h_neg.

        K and V1 are affine in h_i = W x + s B_i A_i x, so [K; V1] h_i = [K; V1] W x + ([K; V1] s B_i)(A_i x):
        one [2g, out] matmul on W x shared by both branches, plus the r-wide LoRA activations through
        a [2g, r] matrix per branch. The B_i matmuls to full width, and the [..., 2, out] stack the
        equations suggest, are never computed. The two-way softmax is a sigmoid of the score difference,
        and V2 is applied once to the alpha-mixed hidden (V2 is affine and the weights sum to 1).
        """
        g = self.gate_q.out_features
        kv_weight = torch.cat([self.gate_k.weight, self.gate_v1.weight])  # [2g, out]
        kv_bias = torch.cat([torch.zeros_like(self.gate_v1.bias), self.gate_v1.bias])
        kv_base = F.linear(base, kv_weight, kv_bias)  # [..., 2g]
        kv_pos = kv_base + F.linear(self.lora_A_pos(self.dropout(x)), kv_weight @ self.lora_B_pos.weight * self.scaling)
        kv_neg = kv_base + F.linear(self.lora_A_neg(x), kv_weight @ self.lora_B_neg.weight * self.scaling)
        (k_pos, v_pos), (k_neg, v_neg) = kv_pos.split(g, dim=-1), kv_neg.split(g, dim=-1)
        q = self.gate_q(x)
        a_neg = torch.sigmoid(((k_neg - k_pos) * q).sum(-1, keepdim=True) / self.temperature)
        alpha = 2.0 * self.beta * a_neg - self.beta
        self.alpha_stats = torch.stack([alpha.mean(), alpha.std()]).detach()
        u_pos = F.gelu(v_pos)
        return self.gate_v2(u_pos + alpha * (F.gelu(v_neg) - u_pos))


def nat_layers(model: nn.Module) -> dict[str, NATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NATLinear)}


def add_nat_layers(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float, gate_dim: int,
                   beta: float, temperature: float) -> dict[str, NATLinear]:
    """Replace every targeted nn.Linear of `model` by a NATLinear wrapping it (in place)."""
    chosen = [(name, m) for name, m in model.named_modules()
              if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)]
    for name, m in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, NATLinear(m, r, alpha, dropout, gate_dim, beta, temperature))
    return nat_layers(model)


def set_mode(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for layer in nat_layers(model).values():
        layer.mode = mode


def load_lora_branch(layers: dict[str, NATLinear], adapter_dir: str | Path, branch: str) -> None:
    """Copy a PEFT adapter's A/B weights into the `branch` (neg|pos) of every NAT layer."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_model.safetensors (not a PEFT adapter directory)")
    state = load_file(str(path))
    used = set()
    for name, layer in layers.items():
        for part in ("A", "B"):
            key = f"{peft_key_prefix(name)}.lora_{part}.weight"
            if key not in state:
                raise ConfigError(f"{path}: has no weights for layer {name} ({key}); was it trained with the "
                                  "same base model and target_modules?")
            target = getattr(layer, f"lora_{part}_{branch}").weight
            if tuple(state[key].shape) != tuple(target.shape):
                raise ConfigError(f"{path}: {key} has shape {tuple(state[key].shape)}, this model needs "
                                  f"{tuple(target.shape)} (different lora.r or base model?)")
            with torch.no_grad():
                target.copy_(state[key].to(target.dtype))
            used.add(key)
    extra = set(state) - used
    if extra:
        raise ConfigError(f"{path}: adapter has weights for layers this model does not adapt "
                          f"(e.g. {sorted(extra)[0]}); target_modules differ")


def pos_adapter_state(layers: dict[str, NATLinear]) -> dict[str, torch.Tensor]:
    """The pos branch as a PEFT adapter state dict (keys as `PeftModel.save_pretrained` writes)."""
    state = {}
    for name, layer in layers.items():
        state[f"{peft_key_prefix(name)}.lora_A.weight"] = layer.lora_A_pos.weight
        state[f"{peft_key_prefix(name)}.lora_B.weight"] = layer.lora_B_pos.weight
    return state


def gate_state(layers: dict[str, NATLinear]) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in layers.items():
        for part in ("gate_q", "gate_k", "gate_v1", "gate_v2"):
            for pname, p in getattr(layer, part).named_parameters():
                state[f"{name}.{part}.{pname}"] = p
    return state


def gate_shapes(layers: dict[str, NATLinear]) -> dict[str, tuple[int, ...]]:
    """Expected gate tensor shapes (from layer sizes, valid even while ZeRO-3 partitions the params)."""
    shapes = {}
    for name, layer in layers.items():
        for part in ("gate_q", "gate_k", "gate_v1", "gate_v2"):
            lin = getattr(layer, part)
            shapes[f"{name}.{part}.weight"] = (lin.out_features, lin.in_features)
            if lin.bias is not None:
                shapes[f"{name}.{part}.bias"] = (lin.out_features,)
    return shapes


def save_gate(layers: dict[str, NATLinear], path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in gate_state(layers).items()}
    save_file(state, str(path))
    saved = load_file(str(path))
    bad = [k for k in expected if k not in saved or tuple(saved[k].shape) != expected[k] or saved[k].numel() == 0]
    if bad:
        raise AdapterSaveError(f"{path}: gate save is broken: {len(bad)} tensors missing, empty or misshapen "
                               f"(e.g. {bad[0]})")


def load_gate(layers: dict[str, NATLinear], path: Path) -> None:
    state = load_file(str(path))
    params = gate_state(layers)
    missing = sorted(set(params) - set(state))
    if missing:
        raise ConfigError(f"{path}: gate weights missing for {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.dtype))


def save_nat_dir(out: Path, layers: dict[str, NATLinear], peft_config, base_model: str, neg_adapter: str,
                 expected_pos: dict[str, tuple[int, ...]], expected_gate: dict[str, tuple[int, ...]],
                 attn_implementation: str = "sdpa") -> None:
    """Write what `load_nat_teacher` reads: pos/ (PEFT), gate.safetensors, nat.json. Verified."""
    from train.models.adapters import save_adapter

    first = next(iter(layers.values()))
    save_adapter(pos_adapter_state(layers), peft_config, out / "pos", expected_pos)
    save_gate(layers, out / GATE_FILE, expected_gate)
    spec = {"base_model": str(Path(base_model).resolve()), "neg_adapter": str(Path(neg_adapter).resolve()),
            "pos_adapter": "pos", "gate": GATE_FILE, "r": first.lora_A_pos.out_features,
            "alpha": first.scaling * first.lora_A_pos.out_features, "target_modules": list(peft_config.target_modules),
            "gate_dim": first.gate_q.out_features, "beta": first.beta, "temperature": first.temperature,
            "attn_implementation": attn_implementation}
    (out / NAT_JSON).write_text(json.dumps(spec, indent=1))


def load_nat_teacher(nat_dir: str | Path, mode: str = "nat", dtype: torch.dtype = torch.float32,
                     ds_config: dict | None = None, device: torch.device | None = None):
    """Base model + neg + pos + gate from a finished stage-nat directory, in `mode`, every weight in `dtype`
    (the adapters and gate, stored in fp32, are rounded to it: train.engine.precision)."""
    from train.config import ModelConfig
    from train.models.loading import load_base_model

    d = Path(nat_dir)
    if not (d / NAT_JSON).is_file():
        raise ConfigError(f"{d}: not a stage-nat output (no {NAT_JSON})")
    spec = json.loads((d / NAT_JSON).read_text())
    model = load_base_model(ModelConfig(path=spec["base_model"],
                                        attn_implementation=spec.get("attn_implementation", "sdpa")),
                            dtype, ds_config=ds_config, device=device)
    layers = add_nat_layers(model, spec["target_modules"], spec["r"], spec["alpha"], 0.0, spec["gate_dim"],
                            spec["beta"], spec["temperature"])
    load_lora_branch(layers, spec["neg_adapter"], "neg")
    load_lora_branch(layers, d / spec["pos_adapter"], "pos")
    load_gate(layers, d / spec["gate"])
    set_mode(model, mode)
    model.requires_grad_(False)
    return model.eval()
