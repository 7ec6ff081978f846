"""Stage `eval`: greedy, self-consistency and ASC accuracy of a model on test questions.

Per question: one greedy rationale and `eval.n` sampled ones, prompted with the template the model
was trained with, each answer (last boxed) graded against the gold with the prepare grader, each
sample scored by the ranker (if given; it must share the template) through the tokenization its
training used. Voting and its weightings are in `train.voting`. `predictions.jsonl` records each
question's exact prompt string.

A stop signal (SIGUSR1/SIGTERM, as the Slurm launcher forwards; often to only some ranks) is
agreed on by all ranks after each batch of questions: every rank saves its batch and exits 75,
which the launcher requeues.

Data parallel: rank r takes every W-th unfinished question; each model is a full copy per rank
(generation under ZeRO-3 would gather every layer for every token). Each finished question is
appended (and flushed) as one line to `predictions-rank<r>.jsonl`, so a killed run loses at most
a batch: a restart reads every predictions file, skips the questions found there and splits the
rest over however many ranks it has. At the end rank 0 writes `predictions.jsonl` (test order),
`metrics.json`, `metrics.md`, TensorBoard scalars and DONE.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from train.backends import is_served
from train.config import EvalConfig
from train.data.answers import last_boxed
from train.data.grading import grade_inline
from train.data.prompt import DEFAULT_TEMPLATE, Prompt, recorded_prompt, render_prompt
from train.data.readers import Question, parse_fields, read_test_questions, report_repeats
from train.engine import distributed as dist_
from train.engine import precision
from train.engine.loggers import check_available
from train.engine.memory import peak_memory
from train.engine.signals import EXIT_CHECKPOINTED, StopRequest
from train.errors import ConfigError
from train.manifest import check_stage_output, dir_digest, file_digest, write_done
from train.models.hub import resolve_model_ref
from train.progress import progress
from train.stages.common import already_done, open_output
from train.voting import WEIGHTINGS, Candidate, any_correct, vote

PREDICTIONS = "predictions.jsonl"


def read_predictions(out: Path) -> dict[str, dict]:
    """Finished questions from every rank's file. A torn last line (killed mid-write) is ignored."""
    done: dict[str, dict] = {}
    for f in sorted(out.glob("predictions-rank*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["qid"]] = rec
    return done


def drop_torn_tail(path: Path) -> None:
    """Cut a line left half-written by a killed run, so the next append starts on a fresh line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _batch_seed(seed: int, qids: list[str]) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{','.join(qids)}".encode()).digest()[:7], "big")


def eval_prompt(cfg: EvalConfig, ranker_spec: dict | None) -> Prompt:
    """The prompt of this eval: the one the model was trained with (template, format and system prompt; or
    eval.prompt_template for a model that records none), which the ranker must share. Mismatches are refused."""
    e = cfg.eval
    recorded = None if is_served(e.backend, e.server.base_url) else recorded_prompt(e.model)
    prompt = recorded or Prompt(e.prompt_template or DEFAULT_TEMPLATE, e.prompt_format or "plain", e.system_prompt)
    for key, given in (("prompt_template", e.prompt_template), ("prompt_format", e.prompt_format),
                       ("system_prompt", e.system_prompt)):
        if recorded is not None and given and getattr(recorded, key) != given:
            raise ConfigError(f"eval.{key} is {given!r} but the model {e.model} was trained with "
                              f"{getattr(recorded, key)!r}; leave eval.{key} empty to use the model's")
    if ranker_spec is not None and Prompt.from_record(ranker_spec) != prompt:
        theirs = Prompt.from_record(ranker_spec)
        raise ConfigError("; ".join(f"eval.ranker: {cfg.eval.ranker} was trained with {k.replace('_', ' ')} "
                                    f"{getattr(theirs, k)!r} but "
                                    f"the model is prompted with {getattr(prompt, k)!r}"
                                    for k in prompt.differences(theirs))
                          + "; train the ranker with the model's data.prompt_template, prompt_format and system_prompt")
    return prompt


def evaluate_batch(backend, ranker, questions: list[Question], cfg: EvalConfig, prompt: Prompt,
                   device: torch.device) -> tuple[list[dict], dict[str, str]]:
    """(a record per answered question, {question id: why not} for those a server never answered)."""
    from train.backends import SamplingSettings

    e = cfg.eval
    settings = SamplingSettings(e.n, e.temperature, e.top_p, e.max_new_tokens,
                                _batch_seed(e.seed, [q.qid for q in questions]))
    gen = backend.generate([q.question for q in questions], settings)
    failed = gen.failed or [""] * len(questions)
    tok = backend.tokenizer
    records, failures = [], {}
    greedy_finished = gen.greedy_finished or [True] * len(questions)
    for q, g, texts, finished, g_finished, why in zip(questions, gen.greedy, gen.samples, gen.finished,
                                                      greedy_finished, failed, strict=True):
        if why:
            failures[q.qid] = f"{q.source}: {why}"
            continue
        answers = [last_boxed(t) for t in [g, *texts]]
        correct = grade_inline(q.gold, answers, e.grader, e.grade_timeout)
        scores = ranker.scores(q.question, texts, finished, device) if ranker is not None and texts else None
        cands = [Candidate(a, c, s if scores else 0.0)
                 for a, c, s in zip(answers[1:], correct[1:], scores or [0.0] * len(texts), strict=True)]
        rec = {"qid": q.qid, "subject": q.subject, "level": q.level, "question": q.question, "gold": q.gold,
               # a served chat model's template is the server's: the user message is what we know
               "prompt": prompt.text(tok, q.question) if tok is not None else render_prompt(prompt.prompt_template,
                                                                                            q.question),
               "greedy": {"text": g, "answer": answers[0], "correct": correct[0], "finished": g_finished},
               "samples": [{"text": t, "finished": f, "answer": c.answer, "correct": c.correct,
                            "ranker": None if scores is None else c.score}
                           for t, f, c in zip(texts, finished, cands, strict=True)],
               "votes": {"sc": vote(cands, "count"), "pass_at_n": any_correct(cands)} if texts else {}}
        if scores is not None and texts:
            rec["votes"].update({f"asc_{w}": vote(cands, w) for w in WEIGHTINGS if w != "count"})
        records.append(rec)
    return records, failures


def summarize(records: list[dict]) -> dict:
    """Accuracies (in %) overall, per subject and per level, and the share of samples cut by max_new_tokens."""
    def block(recs: list[dict]) -> dict:
        out = {"questions": len(recs), "greedy": 100 * float(np.mean([r["greedy"]["correct"] for r in recs]))}
        for key in recs[0]["votes"]:
            out[key] = 100 * float(np.mean([r["votes"][key] for r in recs]))
        # rationales that hit eval.max_new_tokens before EOS (cut, most often without a final answer): the
        # samples', or the greedy ones' when there are no samples (eval.n=0)
        out["unfinished"] = 100 * float(np.mean([not s.get("finished", True) for r in recs for s in
                                                 (r["samples"] or [r["greedy"]])]))
        return out

    groups: dict[str, dict[str, list[dict]]] = {"subject": {}, "level": {}}
    for r in records:
        groups["subject"].setdefault(r["subject"], []).append(r)
        if r["level"]:
            groups["level"].setdefault(r["level"], []).append(r)
    return {"overall": block(records),
            "by_subject": {k: block(v) for k, v in sorted(groups["subject"].items())},
            "by_level": {k: block(v) for k, v in sorted(groups["level"].items())}}


def markdown_table(metrics: dict, n: int, weighting: str) -> str:
    if n == 0:  # greedy only
        lines = ["| group | questions | greedy | unfinished % |", "| --- | --- | --- | --- |"]
        groups = [("**all**", metrics["overall"]), *((f"subject {k}", m) for k, m in metrics["by_subject"].items()),
                  *((f"level {k}", m) for k, m in metrics["by_level"].items())]
        lines += [f"| {name} | {m['questions']} | {m['greedy']:.1f} | {m['unfinished']:.1f} |" for name, m in groups]
        return "\n".join(lines) + "\n"
    asc_key = f"asc_{weighting}" if weighting != "count" else "sc"
    has_asc = asc_key in metrics["overall"]
    head = f"| group | questions | greedy | SC@{n} |" + (f" ASC@{n} ({weighting}) |" if has_asc else "") + \
        f" pass@{n} |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]

    def row(name: str, m: dict) -> str:
        cells = [name, str(m["questions"]), f"{m['greedy']:.1f}", f"{m['sc']:.1f}"]
        cells += [f"{m[asc_key]:.1f}"] if has_asc else []
        return "| " + " | ".join([*cells, f"{m['pass_at_n']:.1f}"]) + " |"

    lines.append(row("**all**", metrics["overall"]))
    lines += [row(f"subject {k}", m) for k, m in metrics["by_subject"].items()]
    lines += [row(f"level {k}", m) for k, m in metrics["by_level"].items()]
    if has_asc:
        o = metrics["overall"]
        keys = {w: "sc" if w == "count" else f"asc_{w}" for w in WEIGHTINGS}
        lines += ["", "ASC vote weightings (all questions; s = sigmoid(ranker output)): "
                  + ", ".join(f"{w.replace('score', 's')} {o[k]:.1f}" for w, k in keys.items() if k in o)]
    return "\n".join(lines) + "\n"


def main(cfg: EvalConfig) -> int:
    from train.backends import choose_backend, make_backend, raise_if_gave_up
    from train.generation import check_generator, kv_cache_bytes_per_token
    from train.models.reward import load_ranker, read_ranker_spec

    out = Path(cfg.engine.output_dir)
    if already_done("eval", out, asdict(cfg)):
        return 0
    # every input is checked before any directory is created or model loaded
    repeats: Counter = Counter()
    questions = read_test_questions(cfg.eval.test, parse_fields(cfg.eval.fields, "--fields (eval.fields)"),
                                    repeats=repeats)
    report_repeats("eval", repeats)
    if cfg.eval.max_questions > 0:
        questions = questions[:cfg.eval.max_questions]
    if not is_served(cfg.eval.backend, cfg.eval.server.base_url):
        cfg.eval.model = resolve_model_ref(cfg.eval.model, "eval.model")
        check_generator(cfg.eval.model)
    name = choose_backend(cfg.eval.backend, cfg.eval.server.base_url, cfg.eval.model)
    check_available(cfg.engine.report_to)
    if cfg.eval.ranker:
        check_stage_output(cfg.eval.ranker, "eval.ranker", ("ranker",))
    prompt = eval_prompt(cfg, read_ranker_spec(cfg.eval.ranker) if cfg.eval.ranker else None)
    device = open_output("eval", cfg, out)
    world, rank = dist_.world(), dist_.rank()
    t0 = time.time()
    done = read_predictions(out)
    remaining = [q for q in questions if q.qid not in done]
    todo = remaining[rank::world]
    bq = cfg.eval.batch_questions
    busiest = math.ceil(len(remaining) / world)
    rounds = math.ceil(busiest / bq)  # the busiest rank's batches: every rank takes part in each round
    dtype = precision.dtype(cfg.engine.precision, device.type == "cpu")
    # the ranker first: the generator's KV budget (hf) and vLLM's memory share are then taken from what is left
    ranker = load_ranker(cfg.eval.ranker, device, dtype) if cfg.eval.ranker else None
    backend = make_backend(name, cfg.eval.model, prompt, device, dtype, cfg.eval.server, cfg.eval.vllm,
                           cfg.eval.max_batch_tokens, cfg.engine.attn_implementation, cfg.eval.seed)
    if dist_.is_main():
        if name == "hf":
            per_token, budget = kv_cache_bytes_per_token(backend.model.config, dtype), backend.budget
            print(f"[eval] generation budget {budget:,} tokens per call ({budget * per_token / 2**30:.1f} GiB of KV "
                  f"cache at {per_token / 2**20:.3f} MiB per token; eval.max_batch_tokens="
                  f"{cfg.eval.max_batch_tokens})", flush=True)
        print(f"[eval] {backend.what} ({name}); {len(questions)} questions ({len(done)} already done), "
              f"{cfg.eval.n} samples each, {world} rank(s)"
              + (f"; ranker {cfg.eval.ranker}" if ranker is not None else "; no ranker")
              + f"; prompt template {prompt.prompt_template!r} ({prompt.prompt_format})", flush=True)
    bar = progress(len(todo), "eval (rank 0)", "question", enabled=dist_.is_main() and cfg.engine.progress)
    mine = out / f"predictions-rank{rank}.jsonl"
    drop_torn_tail(mine)
    failures: dict[str, str] = {}
    with StopRequest() as stop, open(mine, "a", encoding="utf-8") as f:
        for k in range(rounds):
            batch = todo[k * bq:(k + 1) * bq]
            if batch:
                recs, gave_up = evaluate_batch(backend, ranker, batch, cfg, prompt, device)
                failures.update(gave_up)
                for rec in recs:
                    f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
            if dist_.any_rank(stop.requested, device):  # a signal often reaches only some ranks: all stop here
                bar.close()
                print(f"[eval] rank {rank}: stop requested after {min((k + 1) * bq, len(todo))} of {len(todo)} "
                      f"questions (saved); exit {EXIT_CHECKPOINTED}, resubmit to continue", flush=True)
                return EXIT_CHECKPOINTED
    bar.close()
    raise_if_gave_up(failures, out, len(questions), cfg.eval.server.max_retries)
    if dist_.is_main():
        _finish(cfg, out, questions, t0)
    dist_.barrier()
    return 0


def _finish(cfg: EvalConfig, out: Path, questions: list[Question], t0: float) -> None:
    from train.engine.loggers import ScalarLoggers

    done = read_predictions(out)
    missing = [q.qid for q in questions if q.qid not in done]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} questions have no predictions after every rank finished "
                           f"(e.g. {missing[:3]})")
    records = [done[q.qid] for q in questions]
    tmp = out / f".{PREDICTIONS}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out / PREDICTIONS)
    metrics = summarize(records)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    table = markdown_table(metrics, cfg.eval.n, cfg.eval.weighting)
    (out / "metrics.md").write_text(f"# Evaluation of {cfg.eval.model}\n\nTest: {cfg.eval.test}\n\n{table}")
    log = ScalarLoggers(out, cfg.engine.report_to, f"eval {out}", asdict(cfg))
    log.scalars({f"eval/{k}": v for k, v in metrics["overall"].items()}, 0)
    log.close()
    inputs = {"test": file_digest(Path(cfg.eval.test)) if Path(cfg.eval.test).is_file() else dir_digest(cfg.eval.test)}
    write_done(out, stage="eval", config=asdict(cfg), inputs=inputs,
               metrics={**metrics["overall"], "seconds": round(time.time() - t0, 2), "world_size": dist_.world(),
                        **peak_memory()})
    print(table, flush=True)
    print(f"[eval] {metrics['overall']['unfinished']:.1f}% of the {'sampled' if cfg.eval.n else 'greedy'} "
          f"rationales hit eval.max_new_tokens="
          f"{cfg.eval.max_new_tokens} before EOS (metrics.json: unfinished)", flush=True)
    print(f"[eval] wrote {out.resolve()}: metrics.md, metrics.json, predictions.jsonl", flush=True)
