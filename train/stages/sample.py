"""`tdg sample`: collect a teacher's rationales, right and wrong, for a new domain.

n rationales per question from a model in this process (`hf`, data-parallel under torchrun/srun)
or from an OpenAI-compatible server (`openai`; see `train.backends`). Output: `rationales.jsonl`
in the flat layout `tdg prepare` reads and grades (`id`, `question`, `rationale`, `gold`,
`subject`, `level`; gold only where the questions file has one), and DONE.json with the settings.

Resumable like eval: each rank appends a question's n rationales as one write, flushed, to
`part-rank<r>.jsonl.part` after each batch, so a killed run loses at most the questions in flight;
a rerun skips every question with its n rationales on file and splits the rest over the ranks it
has; once the run is done they are merged into rationales.jsonl and deleted.
SIGUSR1/SIGTERM (the Slurm launcher's stop) is agreed on after a batch: exit 75, requeue.
Questions the server never answered (after `sample.server.max_retries` retries) are listed in
`failures.json` and the run exits with an error and no DONE.json: rerunning retries them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from train.backends import (
    Sampled,
    SamplingSettings,
    choose_backend,
    gather_failures,
    is_served,
    make_backend,
    raise_if_gave_up,
)
from train.config import SampleConfig
from train.data.prompt import Prompt, recorded_prompt
from train.data.readers import Question, parse_fields, read_test_questions, report_repeats
from train.engine import distributed as dist_
from train.engine import precision
from train.engine.signals import EXIT_CHECKPOINTED, StopRequest
from train.errors import TdgError
from train.manifest import dir_digest, file_digest, write_done
from train.models.hub import resolve_model_ref
from train.progress import progress
from train.stages.common import already_done, open_output

# some questions failed after every retry: the others are written, the failed ones listed (rerun for them)
EXIT_PARTIAL = 3

OUTPUT = "rationales.jsonl"


def sample_prompt(cfg: SampleConfig, name: str) -> Prompt:
    """The model's recorded prompt (hf, a model trained here), with sample.prompt_* taking precedence."""
    s = cfg.sample
    base = (recorded_prompt(s.model) if name != "openai" else None) or Prompt()
    return Prompt(s.prompt_template or base.prompt_template, s.prompt_format or base.prompt_format,
                  s.system_prompt or base.system_prompt)


def _qid(line: str) -> str | None:
    """The question of one part-file line; None for a line torn by a killed run."""
    try:
        return json.loads(line)["qid"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def part_lines(out: Path) -> Iterator[tuple[str, str]]:
    """(question id, line) of every whole line of every rank's part file."""
    for f in sorted(out.glob("part-rank*.jsonl.part")):
        for line in f.read_text(encoding="utf-8").splitlines():
            qid = _qid(line)
            if qid is not None:
                yield qid, line


def finished_questions(out: Path, n: int) -> set[str]:
    """Questions with all n rationales on file (a torn last line, from a killed run, does not count)."""
    count = Counter(qid for qid, _ in part_lines(out))
    return {q for q, c in count.items() if c >= n}


def keep_complete(path: Path, n: int) -> None:
    """Drop the lines of questions a killed run left with fewer than n rationales (and a torn last line), so a
    rerun asks for those questions again and never mixes two runs' samples of one question."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    qids = [_qid(line) for line in lines]
    count = Counter(q for q in qids if q is not None)
    kept = [line for line, q in zip(lines, qids, strict=True) if q is not None and count[q] >= n]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


def records(q: Question, got: Sampled) -> list[dict]:
    base = {"qid": q.qid, "question": q.question, **({"gold": q.gold} if q.gold else {}), "subject": q.subject,
            "level": q.level}
    return [{"id": f"{q.qid}-s{k}", **base, "rationale": text, "finished": done}
            for k, (text, done) in enumerate(zip(got.texts, got.finished, strict=True))]


def _seed(seed: int, qid: str) -> int:
    return (seed * 1_000_003 + int(qid[:8], 16)) % (2**31 - 1)


def main(cfg: SampleConfig) -> int:
    out = Path(cfg.engine.output_dir)
    if already_done("sample", out, asdict(cfg)):
        return 0
    s = cfg.sample
    repeats: Counter = Counter()
    questions = read_test_questions(s.questions, parse_fields(s.fields, "--fields (sample.fields)"), need_gold=False,
                                    repeats=repeats)
    report_repeats("sample", repeats)
    if s.max_questions > 0:
        questions = questions[:s.max_questions]
    if not is_served(s.backend, s.server.base_url):
        s.model = resolve_model_ref(s.model, "sample.model")
        from train.generation import check_generator

        check_generator(s.model, "sample.model")
    name = choose_backend(s.backend, s.server.base_url, s.model)
    prompt = sample_prompt(cfg, name)
    device = open_output("sample", cfg, out)
    world, rank = dist_.world(), dist_.rank()
    t0 = time.time()
    keep_complete(out / f"part-rank{rank}.jsonl.part", s.n)
    dist_.barrier()  # every rank's file cleaned before any rank reads them all
    done = finished_questions(out, s.n)
    todo = [q for q in questions if q.qid not in done][rank::world]
    rounds = math.ceil(math.ceil((len(questions) - len(done)) / world) / s.batch_questions)
    settings = SamplingSettings(s.n, s.temperature, s.top_p, s.max_new_tokens, s.seed)
    backend = make_backend(name, s.model, prompt, device, precision.dtype(cfg.engine.precision, device.type == "cpu"),
                           s.server, s.vllm, s.max_batch_tokens, seed=s.seed)
    if dist_.is_main():
        print(f"[sample] {backend.what} ({name}); {len(questions)} questions ({len(done)} already done), "
              f"{s.n} rationales each at T {s.temperature}, {world} rank(s); prompt {prompt.prompt_template!r} "
              f"({prompt.prompt_format})", flush=True)
    failures: dict[str, str] = {}
    bar = progress(len(todo), "sample (rank 0)", "question", enabled=dist_.is_main() and cfg.engine.progress)
    mine = out / f"part-rank{rank}.jsonl.part"
    with StopRequest() as stop, open(mine, "a", encoding="utf-8") as f:
        for k in range(rounds):
            batch = todo[k * s.batch_questions:(k + 1) * s.batch_questions]
            if batch:
                texts = [q.question for q in batch]
                got = backend.sample(texts, settings, [_seed(s.seed, q.qid) for q in batch])
                for q, g in zip(batch, got, strict=True):
                    if g.error:
                        failures[q.qid] = f"{q.source}: {g.error}"
                    else:
                        f.write("".join(json.dumps(r) + "\n" for r in records(q, g)))
                f.flush()
                os.fsync(f.fileno())
                bar.update(len(batch))
            if dist_.any_rank(stop.requested, device):
                bar.close()
                print(f"[sample] rank {rank}: stop requested (finished questions saved); exit {EXIT_CHECKPOINTED}, "
                      "resubmit to continue", flush=True)
                return EXIT_CHECKPOINTED
    bar.close()
    retries = sum(dist_.all_gather_object(getattr(backend, "retries", 0)))
    if s.require_all:
        raise_if_gave_up(failures, out, len(questions), s.server.max_retries)
    failed = gather_failures(failures, out)
    if dist_.is_main():
        _finish(cfg, out, [q for q in questions if q.qid not in failed], retries, name, t0, partial=bool(failed))
        if failed:
            print(f"[sample] gave up on {len(failed)} of {len(questions)} questions after {s.server.max_retries} "
                  f"retries each (first: {next(iter(failed.values()))}); they are listed in {out / 'failures.json'}, "
                  f"the other {len(questions) - len(failed)} are in {out / OUTPUT}; exit {EXIT_PARTIAL}: rerun to ask "
                  "again for the failed ones only (--require-all makes this an error)", file=sys.stderr, flush=True)
    dist_.barrier()
    return EXIT_PARTIAL if failed else 0


def _finish(cfg: SampleConfig, out: Path, questions: list[Question], retries: int, backend: str, t0: float,
            partial: bool = False) -> None:
    """rationales.jsonl of `questions` (each with its n rationales), then DONE.json unless `partial` (some
    questions failed: a rerun must ask again for them)."""
    by_qid: dict[str, list[str]] = {}
    for qid, line in part_lines(out):
        by_qid.setdefault(qid, []).append(line)
    lines = []
    for q in questions:
        got = by_qid.get(q.qid, [])[:cfg.sample.n]
        if len(got) < cfg.sample.n:
            raise TdgError(f"{out}: question {q.source} has {len(got)} of {cfg.sample.n} rationales after every "
                           "rank finished")
        lines += got
    tmp = out / f".{OUTPUT}.tmp"
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out / OUTPUT)
    unfinished = sum(not json.loads(line)["finished"] for line in lines)
    src = Path(cfg.sample.questions)
    metrics = {"questions": len(questions), "rationales": len(lines), "backend": backend, "retries": retries,
               "unfinished_fraction": unfinished / max(1, len(lines)), "seconds": round(time.time() - t0, 2),
               "world_size": dist_.world(), "with_gold": sum(bool(q.gold) for q in questions)}
    if partial:
        return
    write_done(out, stage="sample", config=asdict(cfg), metrics=metrics,
               inputs={"questions": file_digest(src) if src.is_file() else dir_digest(src)})
    for part in out.glob("part-rank*.jsonl.part"):  # merged into OUTPUT: nothing left beside it
        part.unlink()
    print(f"[sample] done: {len(lines)} rationales for {len(questions)} questions in {metrics['seconds']:.0f} s "
          f"({retries} retries; {100 * metrics['unfinished_fraction']:.1f}% hit sample.max_new_tokens); "
          f"wrote {out / OUTPUT} (next: tdg prepare --input {out / OUTPUT})", flush=True)
