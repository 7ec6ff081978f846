"""Export: merged LoRA and consolidated ZeRO-3 full fine-tunes load in plain transformers, same logits."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import run_stage
from train.errors import TdgError
from train.export import export

pytestmark = pytest.mark.slow


def _sft(prepared, base, out, *extra):
    return [f"model.path={base}", f"data.path={prepared}", "data.max_len=384", "data.max_tokens=2048",
            "optim.lr=5e-3", "optim.warmup_steps=1", "optim.max_steps=3", "engine.progress=false",
            f"engine.output_dir={out}", *extra]


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _ids():
    return torch.randint(4, 400, (2, 24), generator=torch.Generator().manual_seed(1))


def test_merged_lora_export_gives_the_adapter_logits(tmp_path, prepared_dir, base_model_dir):
    from peft import PeftModel

    src = tmp_path / "sft"
    result = run_stage("sft", _sft(prepared_dir, base_model_dir, src, "lora.target_modules=[q_proj,v_proj,o_proj]"),
                       nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "export"
    export(src, out, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert "final_loss" in (out / "README.md").read_text() and "rationales" in (out / "README.md").read_text()
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), src / "adapter")
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    ids = _ids()
    assert not torch.allclose(_logits(adapted, ids), _logits(base, ids))  # the adapter did something
    torch.testing.assert_close(_logits(exported, ids), _logits(adapted, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(TdgError, match="not empty"):
        export(src, out)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_finetune_consolidated_from_zero3_checkpoint_equals_its_saved_model(tmp_path, prepared_dir,
                                                                                 base_model_dir, zero3_partitioned,
                                                                                 precision):
    """The saved model/ is the checkpoint's fp32 masters in the training precision: a bf16 run saves bf16
    (half the bytes; it was fp32, gathered whole on every rank), from DeepSpeed's layer-by-layer consolidation."""
    from safetensors.torch import load_file

    src = tmp_path / "full"
    result = run_stage("sft", _sft(prepared_dir, base_model_dir, src, "sft.full=true",
                                   f"engine.ds_config={zero3_partitioned}", f"engine.precision={precision}"))
    # torchrun's failure summary fills the last ~3,000 characters of stderr; the worker's own error comes before it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    saved_state = {k: v for f in sorted((src / "model").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert {t.dtype for t in saved_state.values()} == {{"fp32": torch.float32, "bf16": torch.bfloat16}[precision]}
    from_ckpt = tmp_path / "from_ckpt"
    shutil.copytree(src, from_ckpt, ignore=shutil.ignore_patterns("model", "DONE.json"))
    message = export(from_ckpt, tmp_path / "out")
    assert "consolidated" in message and "step3" in message
    consolidated = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    masters = consolidated.state_dict()
    for name, tensor in saved_state.items():  # bf16: the fp32 masters rounded, exactly
        torch.testing.assert_close(tensor, masters[name].to(tensor.dtype), rtol=0, atol=0, msg=name)
    saved = AutoModelForCausalLM.from_pretrained(src / "model", local_files_only=True, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    ids = _ids()
    assert not torch.allclose(_logits(saved, ids), _logits(base, ids))
    if precision == "fp32":
        torch.testing.assert_close(_logits(consolidated, ids), _logits(saved, ids), rtol=1e-6, atol=1e-6)


def test_nat_teacher_is_exported_as_separate_adapters(teacher, tmp_path):
    message = export(teacher, tmp_path / "nat")
    assert "cannot be merged" in message
    for name in ("neg_adapter/adapter_model.safetensors", "pos_adapter/adapter_config.json", "gate.safetensors"):
        assert (tmp_path / "nat" / name).is_file(), name
    assert "cannot be merged" in (tmp_path / "nat" / "README.md").read_text()
