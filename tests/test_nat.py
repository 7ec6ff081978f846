"""The NAT layer in one process: equations, initial state, what trains, and saved == in-memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from train.config import NatConfig, NegConfig, load_config
from train.data.dataset import collate
from train.models.nat import add_nat_layers, load_nat_teacher, set_mode


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _ids(n=2, length=20, vocab=400):
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, vocab, (n, length), generator=g)


def test_nat_at_init_is_exactly_the_base_model_with_gqa(base_model_dir):
    base, nat = _base(base_model_dir), _base(base_model_dir)
    layers = add_nat_layers(nat, ["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, dropout=0.0,
                            gate_dim=16, beta=0.5, temperature=1.0)
    assert any(m.base_layer.in_features != m.base_layer.out_features for m in layers.values())  # k/v under GQA
    for layer in layers.values():  # a trained neg branch: non-zero B
        torch.nn.init.normal_(layer.lora_B_neg.weight)
        torch.nn.init.normal_(layer.lora_B_pos.weight)
    ids = _ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        assert torch.equal(nat(input_ids=ids).logits, expected)  # V2 = 0: y = W x exactly
        set_mode(nat, "neg")
        assert not torch.allclose(nat(input_ids=ids).logits, expected)  # neg branch active on its own
    alpha = next(iter(layers.values())).alpha_stats
    assert alpha is not None and -0.5 <= float(alpha[0]) <= 0.5


def test_gate_equations_by_hand():
    torch.manual_seed(0)
    from train.models.nat import NATLinear

    lin = torch.nn.Linear(6, 3)
    layer = NATLinear(lin, r=2, alpha=4, dropout=0.0, gate_dim=5, beta=0.3, temperature=2.0)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(4, 6)
    s = 4 / 2
    h_pos = lin(x) + layer.lora_B_pos(layer.lora_A_pos(x)) * s
    h_neg = lin(x) + layer.lora_B_neg(layer.lora_A_neg(x)) * s
    q = layer.gate_q(x)
    k_pos, k_neg = layer.gate_k(h_pos), layer.gate_k(h_neg)
    v_pos = layer.gate_v2(torch.nn.functional.gelu(layer.gate_v1(h_pos)))
    v_neg = layer.gate_v2(torch.nn.functional.gelu(layer.gate_v1(h_neg)))
    scores = torch.stack([(q * k_pos).sum(-1), (q * k_neg).sum(-1)], -1) / 2.0
    a_neg = torch.softmax(scores, -1)[:, 1:]
    alpha = 2 * 0.3 * a_neg - 0.3
    expected = lin(x) + (1 - alpha) * v_pos + alpha * v_neg
    torch.testing.assert_close(layer(x), expected)


def _in_process_run(stage_module, cfg):
    from train.engine import distributed as dist_
    from train.engine.ds_config import build_ds_config
    from train.engine.loop import run_training

    device = dist_.setup()
    ds_cfg = build_ds_config(cfg.engine.ds_config, cfg.optim, 1, bf16=False)
    task = stage_module.build(cfg, ds_cfg)
    return task, run_training(task, cfg, device, inputs={})


def _common(prepared, base, out):
    return [f"model.path={base}", f"data.path={prepared}", "data.max_len=384", "data.max_tokens=2048",
            "optim.lr=5e-3", "optim.warmup_steps=1", "optim.max_steps=4", "engine.progress=false",
            "engine.ds_config=zero2", f"engine.output_dir={out}"]


@pytest.fixture(scope="module")
def in_process_neg(tmp_path_factory, prepared_dir, base_model_dir):
    from train.stages import neg

    out = tmp_path_factory.mktemp("ip") / "neg"
    cfg = load_config(NegConfig, None, _common(prepared_dir, base_model_dir, out))
    task, result = _in_process_run(neg, cfg)
    assert result.exit_code == 0
    return task, out


def _batch(task):
    return collate(task.data, list(range(6)), task.pad_id, packing=False)


def test_saved_neg_adapter_reproduces_the_engine_logits(in_process_neg, base_model_dir):
    from peft import PeftModel

    task, out = in_process_neg
    batch = _batch(task)
    with torch.no_grad():
        engine_logits = task.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = PeftModel.from_pretrained(_base(base_model_dir), out / "adapter").eval()
        plain = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain, engine_logits, rtol=1e-6, atol=1e-6)


def test_nat_trains_only_pos_and_gate_and_reloads_exactly(in_process_neg, tmp_path, prepared_dir, base_model_dir):
    from train.models.nat import nat_layers
    from train.stages import nat

    _, neg_out = in_process_neg
    out = tmp_path / "nat"
    cfg = load_config(NatConfig, None, [*_common(prepared_dir, base_model_dir, out), f"nat.neg_adapter={neg_out}",
                                        "nat.gate_dim=16"])
    from train.engine import distributed as dist_
    from train.engine.ds_config import build_ds_config
    from train.engine.loop import run_training

    task = nat.build(cfg, build_ds_config("zero2", cfg.optim, 1, bf16=False))
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    assert run_training(task, cfg, dist_.setup(), inputs={}).exit_code == 0
    after = dict(task.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable_parts = ("lora_A_pos", "lora_B_pos", "gate_q", "gate_k", "gate_v1", "gate_v2")
    assert changed and [n for n in changed if not any(p in n for p in trainable_parts)] == []  # base, neg same
    assert any("lora_B_pos" in n for n in changed) and any("gate_v2" in n for n in changed)
    batch = _batch(task)
    set_mode(task.model, "nat")
    with torch.no_grad():
        engine_logits = task.model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = load_nat_teacher(out, "nat")
        reloaded = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(reloaded, engine_logits, rtol=1e-6, atol=1e-6)
    assert len(nat_layers(teacher)) == 4
