"""Learning curves of the demo's base model: greedy test accuracy against pre-training minutes, per model size.

Chooses the size and pre-training length of `tdg demo`'s tiny Llama (issue 18). Each size is pre-trained
in this process (plain AdamW, the demo's warmup + cosine schedule over `--minutes`, length-grouped padded
batches of `--max-tokens` from the project's batcher) on gold solutions of fresh synthetic questions,
and every `--every` minutes its greedy answers to `--test` held-out questions are graded (the boxed
integer against the gold one). The clock counts training only, not evaluation.

    python bench/demo_learning_curve.py --sizes 64x2,128x4,256x4 --minutes 6
Prints one table per size and records a RESULTS.md row per size (accuracy at the last point;
baseline: the current demo size at the same minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from train.data.answers import last_boxed  # noqa: E402
from train.data.batching import TokenBudgetBatcher  # noqa: E402
from train.data.dataset import collate, prompt_ids  # noqa: E402
from train.data.prompt import bare_question, bare_rationale  # noqa: E402
from train.data.synthetic import generate, make_question, write_gold_solutions  # noqa: E402
from train.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from train.engine.schedule import warmup_cosine  # noqa: E402
from train.generation import left_pad  # noqa: E402
from train.models.loading import build_tiny_model  # noqa: E402


def size_spec(text: str) -> dict:
    """'HIDDENxLAYERS' -> a Llama config like configs/tiny/model.json (head dim 32, grouped-query attention)."""
    hidden, layers = (int(x) for x in text.split("x"))
    heads = max(1, hidden // 32)
    return {"hidden_size": hidden, "intermediate_size": 2 * hidden if hidden <= 64 else 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def data(work: Path, n_pretrain: int, n_test: int, vocab: int):
    raw = work / "raw"
    if not (raw / "test").is_dir():
        generate(raw, n_train=300, n_test=n_test, seed=0)
        write_gold_solutions(raw / "pretrain" / "gold.jsonl", n_pretrain, seed=0)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = [json.loads(line)[k] for line in (raw / "pretrain" / "gold.jsonl").read_text().splitlines()
                 for k in ("question", "rationale")]
        train_tokenizer(texts, tok_dir, vocab_size=vocab)
    tok = load_tokenizer(tok_dir)
    gold = [json.loads(line) for line in (raw / "pretrain" / "gold.jsonl").read_text().splitlines()]
    subjects = ("counting", "groups", "mixed")
    test = [make_question(0, "test", i // 3, subjects[i % 3], rationales=0) for i in range(n_test)]
    return tok_dir, tok, gold, test


def tokenized(tok, gold: list[dict], max_len: int):
    """The gold solutions through the stages' own tokenization (prompt template, EOS, overlong dropped)."""
    import pyarrow as pa

    from train.data.dataset import tokenize

    table = pa.table({"id": [str(i) for i in range(len(gold))],
                      "question": [bare_question(g["question"]) for g in gold],
                      "rationale": [bare_rationale(g["rationale"]) for g in gold]})
    return tokenize(table, tok, max_len)


@torch.no_grad()
def greedy_accuracy(model, tok, test: list[dict], max_new: int = 200, batch: int = 100) -> float:
    model.eval()
    right = 0
    for s in range(0, len(test), batch):
        chunk = test[s:s + batch]
        ids, mask = left_pad(prompt_ids(tok, [bare_question(q["question"]) for q in chunk]), tok.pad_token_id)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
        for q, text in zip(chunk, tok.batch_decode(out, skip_special_tokens=True), strict=True):
            right += last_boxed(text) is not None and last_boxed(text) == last_boxed(q["answer"])
    model.train()
    return 100.0 * right / len(test)


def curve(spec: dict, tok_dir: Path, tok, data_set, test: list[dict], args, work: Path) -> list[tuple]:
    from transformers import LlamaForCausalLM

    name = f"{spec['hidden_size']}x{spec['num_hidden_layers']}"
    model_dir = build_tiny_model(spec, tok_dir, work / f"init_{name}", seed=0)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    batcher = TokenBudgetBatcher(data_set.lengths, args.max_tokens, seed=0)
    # Steps for the planned minutes, from a timed warm-up of 20 steps.
    batches = [b for epoch in range(50) for b in batcher.batches(epoch)]
    t0 = time.perf_counter()
    for b in batches[:20]:
        model(**collate(data_set, b, tok.pad_token_id, packing=False)).loss.backward()
        opt.zero_grad()
    total = int(args.minutes * 60 / ((time.perf_counter() - t0) / 20))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 20, total, 0.1))
    points, trained, tokens, next_eval, step = [], 0.0, 0, args.every * 60, 0
    while step < total:
        t = time.perf_counter()
        batch = collate(data_set, batches[step], tok.pad_token_id, packing=False)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        trained += time.perf_counter() - t
        tokens += int(batch["attention_mask"].sum())
        step += 1
        if trained >= next_eval or step == total:
            acc = greedy_accuracy(model, tok, test)
            samples = sum(len(b) for b in batches[:step])
            points.append((round(trained / 60, 2), step, samples, round(tokens / trained), float(loss), acc))
            print(f"  {name}: {trained / 60:5.2f} min, step {step}/{total}, {samples} samples, "
                  f"{tokens / trained:.0f} tok/s, loss {float(loss):.3f}, greedy {acc:.1f}%", flush=True)
            next_eval += args.every * 60
    return [(name, params, *p) for p in points]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64x2,128x4,256x4", help="HIDDENxLAYERS,... (first: the baseline)")
    ap.add_argument("--minutes", type=float, default=6.0, help="pre-training minutes per size (training only)")
    ap.add_argument("--every", type=float, default=1.0, help="evaluate every this many training minutes")
    ap.add_argument("--pretrain-questions", type=int, default=40000)
    ap.add_argument("--test", type=int, default=300, help="held-out test questions graded at each point")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch (the demo: 2 ranks x 4096)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/tdg_curve")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    tok_dir, tok, gold, test = data(work, args.pretrain_questions, args.test, args.vocab)
    data_set = tokenized(tok, gold, 512)
    rows = []
    for text in args.sizes.split(","):
        rows += curve(size_spec(text), tok_dir, tok, data_set, test, args, work)
    print("\n| size | params | minutes | steps | samples | tokens/s | loss | greedy % |\n" + "| --- " * 8 + "|")
    for r in rows:
        print("| " + " | ".join(str(x) if not isinstance(x, float) else f"{x:.3g}" for x in r) + " |")
    (work / "curves.json").write_text(json.dumps(rows))
    if args.no_record:
        return
    record_curves(rows, len(test))


def record_curves(rows: list, questions: int) -> None:
    """One RESULTS.md row per size: its whole curve, against the first size's accuracy at the end."""
    by_size: dict[str, list] = {}
    for r in rows:
        by_size.setdefault(r[0], []).append(r)
    base = next(iter(by_size.values()))[-1]
    half = 1.96 * math.sqrt(max(base[-1], 1) * (100 - base[-1]) / questions)
    for name, points in by_size.items():
        last = points[-1]
        curve = ", ".join(f"{p[2]:g} min {p[-1]:.1f}%" for p in points)
        record("demo base model: greedy % against pre-training minutes (bench/demo_learning_curve.py)",
               f"{base[0]}: {base[-1]:.1f}% after {base[2]:g} min", f"{name} ({last[1] / 1e6:.2f}M params, "
               f"{last[5]:,} tokens/s, {last[4]:,} samples): {curve}", f"{last[-1] - base[-1]:+.1f} points",
               f"choose the demo's size and pre-training length ({questions} test questions: 95% half-width "
               f"about {half:.1f} points)")


if __name__ == "__main__":
    main()
