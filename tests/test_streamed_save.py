"""A full fine-tune's model dir written one parameter at a time, in shards: what save_pretrained would write,
loadable by from_pretrained, with rank 0 never holding more than a shard."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from train.engine.streamed_save import INDEX, save_model_streamed


def _model(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shards_load_back_exactly_and_match_save_pretrained(tmp_path, dtype):
    model = _model(dtype)
    biggest = max(p.numel() * p.element_size() for p in model.parameters())
    info = save_model_streamed(model, tmp_path / "streamed", shard_bytes=biggest)
    model.save_pretrained(tmp_path / "hf")
    files = sorted((tmp_path / "streamed").glob("model-*.safetensors"))
    assert info["model_files"] == len(files) > 2 and not list((tmp_path / "streamed").glob(".shard-*"))
    index = json.loads((tmp_path / "streamed" / INDEX).read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == {
        f.name for f in files}
    for f in files:  # a shard is written once it reaches the bound: rank 0 holds under bound + one tensor
        with safe_open(str(f), framework="pt") as g:
            numel = sum(torch.Size(g.get_slice(k).get_shape()).numel() for k in g.keys())  # noqa: SIM118
            assert numel * model.dtype.itemsize < 2 * biggest
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", local_files_only=True, dtype=dtype)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ours = json.loads((tmp_path / "streamed" / "config.json").read_text())
    theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert ours == theirs and ours["dtype"] == str(dtype).split(".")[1]
    assert (tmp_path / "streamed" / "generation_config.json").is_file()


def test_a_small_model_is_one_file_as_save_pretrained_writes_it(tmp_path):
    model = _model(torch.float32)
    info = save_model_streamed(model, tmp_path / "one")
    assert info["model_files"] == 1 and (tmp_path / "one" / "model.safetensors").is_file()
    assert not (tmp_path / "one" / INDEX).exists()
    assert info["model_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
