"""Eval's decoding against `model.generate`: the time of the demo student's generation, same tokens.

`generate` computes every row of a batch until the longest one ends; `train.decoding.decode` drops
rows that have ended. This takes the demo's student (its export) and the first questions of its test
split, prompts them as stage eval does, and decodes each batch of `eval.batch_questions` questions both
ways (greedy, then `eval.n` samples per question at `eval.temperature`, as configs/tiny/eval.yaml sets
them), alternating which runs first, on one thread as each eval rank runs. Every batch's tokens must be
equal; the ratio of total times is recorded.

    python bench/decode.py --demo demo_out --questions 128
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CONFIGS, demo_bench_args, demo_outputs, record  # noqa: E402
from train.data.dataset import prompt_ids  # noqa: E402
from train.data.prompt import recorded_prompt  # noqa: E402
from train.data.readers import read_test_questions  # noqa: E402
from train.decoding import decode, generate_tokens  # noqa: E402
from train.generation import left_pad, load_generator  # noqa: E402


def main() -> None:
    args = demo_bench_args(__doc__, steps=None, repeats=False, extra=lambda ap: ap.add_argument(
        "--questions", type=int, default=128, help="first N test questions (batches of eval.batch_questions)"))
    torch.set_num_threads(1)
    demo = demo_outputs(args.demo)
    e = yaml.safe_load((CONFIGS / "eval.yaml").read_text())["eval"]
    model, tok, _ = load_generator(demo / "export", torch.device("cpu"))
    prompt = recorded_prompt(demo / "export")
    questions = [q.question for q in read_test_questions(demo / "raw" / "test")][:args.questions]
    pad = tok.pad_token_id
    ways = {"generate": generate_tokens, "decode": decode}
    seconds = dict.fromkeys(ways, 0.0)
    rows = lengths = 0
    for i, start in enumerate(range(0, len(questions), e["batch_questions"])):
        ids, mask = left_pad(prompt_ids(tok, questions[start:start + e["batch_questions"]], prompt), pad)
        for n, how in ((1, {}), (e["n"], {"sample": True, "temperature": e["temperature"]})):
            batch = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            out = {}
            for name in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
                torch.manual_seed(start)
                t0 = time.perf_counter()
                out[name] = ways[name](model, *batch, e["max_new_tokens"], tok.eos_token_id, pad, **how)
                seconds[name] += time.perf_counter() - t0
            if not torch.equal(out["generate"], out["decode"]):
                sys.exit(f"batch at question {start} (n={n}): decode's tokens differ from generate's")
            ended = (out["decode"] == tok.eos_token_id)
            lengths += int(torch.where(ended.any(-1), ended.int().argmax(-1) + 1, ended.shape[1]).sum())
            rows += len(batch[0])
        print(f"{start + e['batch_questions']} questions: generate {seconds['generate']:.1f} s, decode "
              f"{seconds['decode']:.1f} s", flush=True)
    ratio = seconds["generate"] / seconds["decode"]
    record(f"eval decoding: the demo's student, {len(questions)} test questions x (greedy + {e['n']} samples at T "
           f"{e['temperature']}), batches of {e['batch_questions']} questions, 1 thread; mean generation "
           f"{lengths / rows:.0f} tokens, max_new_tokens {e['max_new_tokens']}",
           f"model.generate {seconds['generate']:.1f} s", f"decode {seconds['decode']:.1f} s (same tokens)",
           f"{ratio:.2f}x", "faster, same tokens: " + ("met" if ratio > 1 else "missed"))


if __name__ == "__main__":
    main()
