"""data.prompt_format=chat: the tokenizer's chat template around the prompt, identical in every stage and eval,
recorded, and refused when stages disagree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_stage

from train.data.dataset import encode, prompt_ids
from train.data.prompt import Prompt
from train.data.tokenizer import load_tokenizer
from train.errors import ConfigError

# a Llama-2-style template: BOS, an optional <<SYS>> block, [INST] ... [/INST]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}"
                 "<</SYS>>\n{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %} {% endif %}")
CHAT = Prompt("{question}", "chat", "Think step by step.")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, base_model_dir) -> Path:
    """The tiny base model whose tokenizer carries a chat template."""
    out = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(base_model_dir, out)
    tok = load_tokenizer(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


def test_chat_prompts_are_the_templates_text_with_one_bos_and_the_rationale_after_it(chat_model):
    tok = load_tokenizer(chat_model)
    question, rationale = "What is 2+3?", "2+3 = \\boxed{5}"
    text = CHAT.text(tok, question)
    assert text == "<s><<SYS>>Think step by step.<</SYS>>\n[INST] What is 2+3? [/INST] "
    (ids,) = prompt_ids(tok, [question], CHAT)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "") == text.replace(" ", "")
    prompts, targets = encode(tok, [question], [rationale], CHAT)
    assert prompts == [ids] and tok.decode(targets[0]) == rationale
    plain_ids = prompt_ids(tok, [question], Prompt())[0]
    assert plain_ids != ids and plain_ids[0] == tok.bos_token_id


# Mistral-7B-Instruct's template in substance: BOS, [INST] user [/INST], no system role (it raises)
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
                    "{{ m['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles "
                    "are supported!') }}{% endif %}{% endfor %}")


def test_chat_with_the_real_32k_tokenizer_and_a_template_that_refuses_a_system_prompt(llama32k_dir, tmp_path):
    """Mistral's 32k sentencepiece vocabulary under its [INST] template: the prompt ids are the template's own
    tokenization (one BOS), the rationale's ids decode back to it exactly, and a system prompt the template
    refuses is a ConfigError naming data.system_prompt, not a jinja traceback."""
    tok = load_tokenizer(llama32k_dir)
    tok.chat_template = MISTRAL_TEMPLATE
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    chat = Prompt("Problem:\n{question}\nSolution:\n", "chat")
    question = "Let $f(x) = 3x^2 - 5$. What is $f(f(1))$?"
    rationale = "We have $f(1) = -2$, so $f(f(1)) = f(-2) = 3 \\cdot 4 - 5 = \\boxed{7}$."
    (ids,) = prompt_ids(tok, [question], chat)
    expected = tok.apply_chat_template([{"role": "user", "content": chat.prompt_template.format(question=question)}],
                                       tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == list(expected) and ids.count(tok.bos_token_id) == 1 and tok.vocab_size == 32000
    prompts, targets = encode(tok, [question], [rationale], chat)
    assert prompts == [ids] and tok.decode(targets[0]) == rationale
    with pytest.raises(ConfigError, match="leave data.system_prompt empty"):
        Prompt("{question}", "chat", "Be brief.").text(tok, question)


def test_chat_needs_a_template_and_a_system_prompt_needs_chat(tokenizer_dir):
    with pytest.raises(ConfigError, match="has no chat template"):
        CHAT.text(load_tokenizer(tokenizer_dir), "q")
    from train.config import NegConfig, load_config

    with pytest.raises(ConfigError, match="data.system_prompt: needs data.prompt_format=chat"):
        load_config(NegConfig, None, ["model.path=m", "engine.output_dir=o", "data.system_prompt=be brief"])


@pytest.mark.slow
def test_stages_record_the_chat_format_and_refuse_an_output_prompted_otherwise(tmp_path, chat_model, prepared_dir):
    chat = ["data.prompt_format=chat", "data.system_prompt=Think step by step.", 'data.prompt_template="{question}"']
    common = [f"model.path={chat_model}", f"data.path={prepared_dir}", "optim.max_steps=2", "engine.progress=false"]
    neg = tmp_path / "neg"
    r = run_stage("neg", ["--config", "configs/tiny/neg.yaml", *common, *chat, f"engine.output_dir={neg}"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    data = yaml.safe_load((neg / "config.yaml").read_text())["data"]
    assert (data["prompt_format"], data["system_prompt"]) == ("chat", "Think step by step.")
    assert json.loads((neg / "DONE.json").read_text())["config"]["data"]["prompt_format"] == "chat"
    # nat over the chat neg adapter, prompted plainly: refused, naming the setting that differs
    r = run_stage("nat", ["--config", "configs/tiny/nat.yaml", *common, f"nat.neg_adapter={neg}",
                          f"engine.output_dir={tmp_path / 'nat_plain'}"], nproc=1)
    assert r.returncode == 2
    assert "data.prompt_format is 'plain' but the neg stage" in r.stderr and "was trained with 'chat'" in r.stderr
    nat = tmp_path / "nat"
    r = run_stage("nat", ["--config", "configs/tiny/nat.yaml", *common, *chat, f"nat.neg_adapter={neg}",
                          f"engine.output_dir={nat}"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    # score with another system prompt: refused before the teacher is loaded
    other = [*chat[:1], "data.system_prompt=Be brief.", chat[2]]
    r = run_stage("score", ["--config", "configs/tiny/score.yaml", f"data.path={prepared_dir}", f"score.nat_dir={nat}",
                            *other, f"engine.output_dir={tmp_path / 'score'}", "engine.ds_config=none"], nproc=1)
    assert r.returncode == 2 and "data.system_prompt is 'Be brief.' but the NAT teacher" in r.stderr
    # eval prompts the chat model through its chat template; the export records it for serving
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"problem": "What is 1+1?", "solution": "\\boxed{2}"}) + "\n")
    r = run_stage("eval", ["--model", str(neg), "--test", str(test), "--num-samples", "2", "--output",
                           str(tmp_path / "eval"), "eval.max_new_tokens=4", "engine.progress=false"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    (pred,) = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert pred["prompt"] == "<s><<SYS>>Think step by step.<</SYS>>\n[INST] What is 1+1? [/INST] "
    from train.export import export

    export(str(neg), str(tmp_path / "export"))
    rec = json.loads((tmp_path / "export" / "tdg.json").read_text())
    assert (rec["prompt_format"], rec["system_prompt"]) == ("chat", "Think step by step.")
    assert "prompt format: chat" in (tmp_path / "export" / "README.md").read_text()
