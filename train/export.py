"""`tdg export`: a stage output -> a Hugging Face model dir that serves with no project code.

What the source directory holds decides what happens:
- `adapter/` (sft, neg, distill with LoRA): merged into its base model (PEFT `merge_and_unload`);
- `model/` (a full fine-tune): re-saved as it is;
- only `checkpoints/` of a full fine-tune (e.g. a run stopped before its final save): the newest
  complete ZeRO checkpoint is consolidated with DeepSpeed's `zero_to_fp32` helpers;
- `nat.json` (a NAT teacher): cannot be merged, the gate is a nonlinear function of both branches;
  the neg and pos adapters are exported side by side as PEFT adapters instead, with the gate.
The output has sharded safetensors, config, tokenizer, generation config, a README card with
the training provenance (the stage's DONE.json: config and metrics, and the data statistics) and
`tdg.json` with the prompt template the model was trained with (what eval prompts it with).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from train.data.prompt import EXPORT_JSON, recorded_prompt
from train.errors import TdgError
from train.manifest import read_done
from train.models.nat import NAT_JSON

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _card(src: Path, kind: str, base: str) -> str:
    done = read_done(src) or {}
    config = done.get("config", {})
    prompt = recorded_prompt(src)
    lines = [f"# Exported from `{src}`", "", f"- kind: {kind}", f"- base model: `{base}`",
             *([f"- prompt (the question replaces {{question}}; the model writes the rationale after it): "
                f"`{prompt.prompt_template!r}`",
                f"- prompt format: {prompt.prompt_format}" + (" (the tokenizer's chat template, generation prompt "
                                                              "added; the prompt above is the user message)"
                                                              if prompt.prompt_format == "chat" else ""),
                *([f"- system prompt: `{prompt.system_prompt!r}`"] if prompt.system_prompt else [])]
              if prompt is not None else []),
             f"- exported by tdg-trainer {done.get('version', '?')}; stage finished {done.get('finished_at', '?')}"]
    data_path = config.get("data", {}).get("path")
    stats = Path(data_path) / "stats.json" if data_path else None
    if stats is not None and stats.is_file():
        total = json.loads(stats.read_text())["subjects"]["ALL"]
        lines += ["", "## Training data", "", f"`{data_path}`: {total['questions']} questions, "
                  f"{total['rationales']} rationales ({total['positives']} positive, {total['negatives']} negative)"]
    if done.get("metrics"):
        lines += ["", "## Final metrics", "", "```json", json.dumps(done["metrics"], indent=1), "```"]
    if config:
        lines += ["", "## Stage config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


def check_trained_base(src: Path, base: str) -> None:
    """The base an adapter is merged into is the one it was trained on, by content (DONE.json records it): a base
    replaced at the same path since would merge into garbage without a word."""
    from train.manifest import trained_on_other_weights

    if trained_on_other_weights(src, base):
        raise TdgError(f"{src}: its adapter was trained on other weights than those now at {base} (the base changed "
                       "since training); restore that base, or train again")


def _save(model, tokenizer_dir: str, out: Path, max_shard_size: str, dtype: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    model = model.to(DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(out)
    except OSError:  # the base had none: derive one from the model config
        GenerationConfig.from_model_config(model.config).save_pretrained(out)


def _load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def export(src: str | Path, out: str | Path, max_shard_size: str = "2GB", dtype: str = "float32") -> str:
    """Export `src`; returns a one-line description of what was written."""
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        raise TdgError(f"{out}: output directory exists and is not empty")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if (src / NAT_JSON).is_file():
        spec = json.loads((src / NAT_JSON).read_text())
        shutil.copytree(spec["neg_adapter"], tmp / "neg_adapter")
        shutil.copytree(src / spec["pos_adapter"], tmp / "pos_adapter")
        shutil.copy(src / spec["gate"], tmp / spec["gate"])
        (tmp / "README.md").write_text(
            "# NAT teacher (not merged)\n\nA NAT model cannot be merged into plain weights: its gate mixes the "
            "neg and pos branches nonlinearly, per token. `neg_adapter/` and `pos_adapter/` are PEFT adapters "
            "for the base model below; `pos_adapter` alone is the positive branch, `neg_adapter` the negative "
            "teacher. To use the full teacher, load the original stage directory with "
            "`train.models.nat.load_nat_teacher`.\n\n" + _card(src, "NAT teacher", spec["base_model"]))
        what = (f"NAT teachers cannot be merged (the gate is nonlinear): exported the neg and pos adapters "
                f"separately to {out}/neg_adapter and {out}/pos_adapter")
    elif (src / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((src / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        check_trained_base(src, base)
        merged = PeftModel.from_pretrained(_load(base), src / "adapter").merge_and_unload()
        _save(merged, base, tmp, max_shard_size, dtype)
        (tmp / "README.md").write_text(_card(src, "LoRA adapter merged into its base", base))
        what = f"merged {src / 'adapter'} into {base} -> {out}"
    elif (src / "model" / "config.json").is_file():
        _save(_load(str(src / "model")), str(src / "model"), tmp, max_shard_size, dtype)
        (tmp / "README.md").write_text(_card(src, "full fine-tune", str(src / "model")))
        what = f"re-saved the full fine-tune {src / 'model'} -> {out}"
    else:
        what = _export_from_checkpoint(src, tmp, out, max_shard_size, dtype)
    prompt = recorded_prompt(src)
    if prompt is not None:  # eval prompts an exported model the way it was trained
        (tmp / EXPORT_JSON).write_text(json.dumps({**prompt.record(), "source": str(src.resolve())}, indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return what


def _export_from_checkpoint(src: Path, tmp: Path, out: Path, max_shard_size: str, dtype: str) -> str:
    """A full fine-tune's newest complete ZeRO checkpoint, consolidated into the base architecture."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from train.engine import checkpoint as ckpt

    latest = ckpt.latest(src / "checkpoints")
    config_file = src / "config.yaml"
    if latest is None or not config_file.is_file():
        raise TdgError(f"{src}: nothing to export (no adapter/, model/, {NAT_JSON} or complete checkpoint)")
    config = yaml.safe_load(config_file.read_text())
    if not (config.get("sft", {}).get("full") or config.get("distill", {}).get("full")):
        raise TdgError(f"{src}: checkpoints of LoRA runs hold no base weights; finish the run, then export its "
                       "adapter/")
    base = config["model"]["path"]
    state = get_fp32_state_dict_from_zero_checkpoint(str(src / "checkpoints"), tag=latest.tag)
    model = _load(base)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise TdgError(f"{src / 'checkpoints' / latest.tag}: does not match {base} "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    _save(model, base, tmp, max_shard_size, dtype)
    (tmp / "README.md").write_text(_card(src, f"full fine-tune, consolidated from ZeRO checkpoint {latest.tag}",
                                         base))
    return f"consolidated {src / 'checkpoints' / latest.tag} (step {latest.global_step}) -> {out}"
