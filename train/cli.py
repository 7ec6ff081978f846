"""Command line: `tdg <subcommand>` or `python -m train <subcommand>`.

Errors a user can fix (bad input, bad config) are printed as one line without a traceback and
exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from train.data.prompt import DEFAULT_TEMPLATE
from train.demo_options import SHIPPED_BASE, DemoOptions
from train.engine import rank_errors
from train.engine.signals import EXIT_CHECKPOINTED
from train.errors import StageStopped, TdgError
from train.plan import PLANNED_STAGES
from train.stage_table import STAGES

EXIT_USER_ERROR = 2


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="grade rationales and write a prepared data set",
        description="Read rationales (TDG layout <root>/<subject>/*.jsonl with question/answer/generated_answer, "
                    "or flat records question/rationale/gold[/id][/subject][/level][/label] in jsonl, json, parquet "
                    "or a datasets save_to_disk directory; other field names through --fields), grade each final "
                    "answer "
                    "(last \\boxed{}) against the gold answer, and write parquet shards, stats.json and DONE.json "
                    "to OUTPUT. Prints a per-subject table.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files (.jsonl, .json, .parquet), datasets save_to_disk directories, or directories "
                        "searched recursively for *.jsonl, *.parquet and datasets directories")
    p.add_argument("--fields", metavar="MAP", default="",
                   help="the input's field names, as OURS=THEIRS pairs: question=problem,rationale=response,"
                        "gold=answer (and label=COLUMN where the data is already graded: bool or pos/neg; id, "
                        "subject and level too)")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory; written to a temporary sibling and renamed when complete")
    p.add_argument("--grader", choices=["math-verify", "hendrycks"], default="math-verify",
                   help="answer equivalence: math-verify (symbolic, default) or hendrycks (the MATH paper's "
                        "string normalisation)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="grading worker processes (default: number of CPUs)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad input lines/files: fail (exit non-zero naming FILE:LINE) or skip and count them")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds one answer may take to grade; slower ones count as ungradable (negative)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer directory: sample lengths in tokens (BOS + prompt + rationale + EOS) per subject "
                        "and label, with the share each max_len of 256/512/1024/2048 keeps; choose data.max_len "
                        "from them (default: lengths approximated by words+symbols)")
    p.add_argument("--prompt-template", metavar="TEXT", default=DEFAULT_TEMPLATE,
                   help="the prompt template the lengths are measured with; use the stages' data.prompt_template "
                        f"(default {DEFAULT_TEMPLATE!r}; in bash write newlines as $'...\\n...')")
    p.add_argument("--prompt-format", choices=["plain", "chat"], default="plain",
                   help="as the stages' data.prompt_format: chat measures with the tokenizer's chat template "
                        "(needs --tokenizer)")
    p.add_argument("--system-prompt", metavar="TEXT", default="", help="as the stages' data.system_prompt (chat)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="run the pipeline on the embedded synthetic data (CPU, minutes)",
        description="Generate the embedded synthetic arithmetic data set (a teacher that is often wrong, most of "
                    "all on long chains, as GPT-3.5 on MATH), train its tokenizer, prepare it (printing the regime "
                    "table), build a tiny Llama pre-trained on gold solutions of the short chains only (or install "
                    "the one shipped in configs/tiny/base when it was pre-trained from the same data and recipe), "
                    "then run "
                    "every stage with torchrun (DeepSpeed on CPU): sft-pos (the plain distillation baseline), neg, "
                    "nat, score, distill, export of the student, ranker, and eval on the held-out test split: the "
                    "base and sft-pos greedy, the student greedy, self-consistency and ASC. Prints the three "
                    "side by side with 95% CIs and paired differences from sft-pos. "
                    "Every step is skipped when its output is complete, so rerunning resumes.",
    )
    p.add_argument("--output", default="demo_out", metavar="DIR", help="where every stage writes (default demo_out)")
    p.add_argument("--questions", type=int, default=600, help="training questions to generate (8 rationales each)")
    p.add_argument("--test-questions", type=int, default=1500,
                   help="held-out test questions to generate (1500: a 95%% CI of about +-1.8 points near 82%% "
                        "accuracy, +-2.3 near 60%%; the ablation in docs/experiments.md used 2400 for +-2 everywhere)")
    p.add_argument("--pretrain-questions", type=int, default=DemoOptions.pretrain_questions,
                   help="fresh questions whose gold solutions pre-train the tiny base model")
    p.add_argument("--pretrain-levels", default=",".join(map(str, DemoOptions.pretrain_levels)), metavar="L,L",
                   help="the levels (operations - 1) of those questions: the base learns the short chains only, "
                        "and the teacher's rationales show it the long ones (bench/demo_learning_curve.py)")
    p.add_argument("--pretrain-epochs", type=int, default=DemoOptions.pretrain_epochs,
                   help="passes over the pre-training solutions")
    p.add_argument("--valid-questions", type=int, default=DemoOptions.valid_questions,
                   help="validation questions (their own seed, disjoint from every other split): hyperparameters "
                        "are chosen on them, never on the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="grading worker processes")
    p.add_argument("--vocab-size", type=int, default=512, help="sentencepiece vocabulary size")
    p.add_argument("--nproc", type=int, default=2, help="processes per training stage (torchrun)")
    p.add_argument("--base", default=str(SHIPPED_BASE), metavar="DIR",
                   help="a pre-trained base (tools/publish_demo_base.py) installed instead of pre-training when it "
                        "was pre-trained from this demo's data, tokenizer and initial weights under its recipe and "
                        "world size; otherwise the demo says what differs and pre-trains (default: the base shipped "
                        "in configs/tiny/base, 15 minutes of pre-training on 2 cores)")
    p.add_argument("--train-base", action="store_true",
                   help="pre-train the base here even when the --base one matches (to reproduce it)")
    p.add_argument("--ablation", action="store_true",
                   help="afterwards, run the negative-data ablation (tdg ablation) on the demo's data and print "
                        "its table (95%% CIs over seeds and questions, paired differences from sft-pos); writes "
                        "DIR/ablation/results.md and ablation.png")
    p.add_argument("--ablation-seeds", type=int, default=3, metavar="N", help="seeds of the ablation (default 3)")
    p.add_argument("--ablation-steps", type=int, default=0, metavar="N",
                   help="cap every ablation training stage at N optimizer steps (0: the configs' full epochs)")
    p.add_argument("--ablation-questions", type=int, default=0, metavar="N",
                   help="evaluate the ablation on the first N test questions only (0: all)")


# each command's --help example, from its own keys (tests/test_cli.py resolves every one)
OVERRIDE_EXAMPLES = {"training": "optim.lr=1e-4 data.max_tokens=2048",
                     "score": "score.top_k=16 data.max_len=512", "eval": "eval.n=8 eval.temperature=0.7",
                     "sample": "sample.temperature=0.7 sample.max_new_tokens=1024",
                     "ablation": "ablation.seeds=[0,1] ablation.nproc=4"}

SAMPLE_SHORTCUTS = {"model": "sample.model", "questions": "sample.questions", "fields": "sample.fields",
                    "n": "sample.n", "temperature": "sample.temperature", "backend": "sample.backend",
                    "base_url": "sample.server.base_url", "output": "engine.output_dir",
                    "require_all": "sample.require_all"}
EVAL_SHORTCUTS = {"model": "eval.model", "test": "eval.test", "ranker": "eval.ranker", "n": "eval.n",
                  "fields": "eval.fields", "output": "engine.output_dir", "backend": "eval.backend",
                  "base_url": "eval.server.base_url"}


def config_keys_help(cls) -> str:
    """Every config key with its type, default and the comment beside it in train/config.py."""
    import dataclasses
    import inspect
    import re
    import typing

    from train.config import _type_name

    lines = []

    def comments(c) -> dict[str, str]:
        found = {}
        for klass in reversed(c.__mro__):
            if dataclasses.is_dataclass(klass):
                for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.+)$", inspect.getsource(klass), re.M):
                    found[m.group(1)] = m.group(2).strip()
        return found

    def walk(c, prefix: str) -> None:
        hints, docs = typing.get_type_hints(c), comments(c)
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix + f.name} ({_type_name(tp)}, default {default!r})")
            if f.name in docs:
                lines.append(f"      {docs[f.name]}")

    walk(cls, "")
    return "config keys (set in the YAML file or as key=value overrides):\n" + "\n".join(lines)


class _StageParser(argparse.ArgumentParser):
    """A stage's parser, whose config-keys epilog is built only when its help is printed: inspecting every config
    class's source took 1.4 s of each stage process's start."""

    def __init__(self, *args, config_class=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config_class = config_class

    def format_help(self) -> str:
        if self.config_class is not None and self.epilog is None:
            self.epilog = config_keys_help(self.config_class)
        return super().format_help()


def _add_stage(sub, name: str) -> None:
    import importlib

    summary, module, cls_name = STAGES[name]
    cls = getattr(importlib.import_module("train.config"), cls_name)
    p = sub.add_parser(
        name, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{summary}. " + (
            "Runs on this node: it launches every stage itself with torchrun (ablation.nproc processes); a rerun "
            "skips finished stages." if name == "ablation" else
            "Launch one process per device with torchrun or srun (see slurm/); "
            "a plain call runs as a single process. Finished outputs (DONE.json) are skipped; "
            "a partial run resumes from its latest complete checkpoint. Exit status 75 means "
            "'stopped by a signal after a checkpoint: resubmit to continue' (each worker's status: torchrun "
            "itself exits 1 when its workers exit 75, so requeue on the workers' status, as slurm/launch.sh does "
            "with srun, or on the log line 'stop requested')."),
        config_class=cls)
    p.add_argument("--config", metavar="FILE", help="stage config (YAML); see configs/ for examples")
    p.add_argument("--print", metavar="KEY", dest="print_key", default=None,
                   help="print the resolved value of a config key (e.g. engine.output_dir) and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"dotted overrides, e.g. {OVERRIDE_EXAMPLES.get(name, OVERRIDE_EXAMPLES['training'])}")
    if name == "sample":  # the common case without a config file
        p.add_argument("--model", metavar="M", help="the teacher (sample.model): a model dir, cached hub id or "
                       "stage output (hf); the served model's name (openai)")
        p.add_argument("--questions", metavar="PATH", help="questions (sample.questions): every format eval's "
                       "--test takes; a gold answer, where there is one, is carried to the output")
        p.add_argument("--fields", metavar="MAP", help="the questions file's field names (sample.fields)")
        p.add_argument("--n", "--num-samples", dest="n", type=int, metavar="N",
                       help="rationales per question (sample.n, default 8); under torchrun spell it --num-samples")
        p.add_argument("--temperature", type=float, help="sampling temperature (sample.temperature, default 0.5)")
        p.add_argument("--backend", choices=["auto", "hf", "vllm", "openai"], help="sample.backend (default auto: "
                       "openai when --base-url is given, else vllm when it imports and a GPU is here, else hf)")
        p.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible server, e.g. http://node:8000/v1 "
                       "(sample.server.base_url); its key is read from $OPENAI_API_KEY (sample.server.api_key_env)")
        p.add_argument("--output", metavar="DIR", help="output directory (engine.output_dir)")
        p.add_argument("--require-all", action="store_true", default=None,
                       help="fail (exit 2) when any question failed after every retry (sample.require_all); by "
                            "default the others are written, the failed ones listed in failures.json, exit 3")
    if name == "score":
        p.add_argument("--restart", action="store_true", default=None,
                       help="when engine.output_dir holds shards scored under another recipe (another teacher, "
                            "top_k, data, prompt or max_len), delete them and score anew (score.restart); by "
                            "default the run is refused, naming what differs")
    if name == "eval":  # the common case without a config file
        p.add_argument("--model", metavar="DIR", help="model to evaluate (eval.model): a model dir, a hub id in "
                       "the local HF cache, or a stage output (adapter/, model/ or NAT)")
        p.add_argument("--test", metavar="PATH", help="test questions (eval.test): MATH-style or question/answer "
                       "records in jsonl, json or parquet, a datasets directory, or a TDG-layout directory")
        p.add_argument("--fields", metavar="MAP", help="the test file's field names (eval.fields), e.g. "
                       "question=prompt,gold=final_answer")
        p.add_argument("--ranker", metavar="DIR", help="stage-ranker output for ASC (eval.ranker)")
        p.add_argument("--n", "--num-samples", dest="n", type=int, metavar="N",
                       help="sampled rationales per question (eval.n, default 16); under torchrun spell it "
                            "--num-samples (torchrun's own parser takes --n for one of its options)")
        p.add_argument("--output", metavar="DIR", help="output directory (engine.output_dir; default "
                       "MODEL/eval-<test name>)")
        p.add_argument("--backend", choices=["auto", "hf", "vllm", "openai"], help="eval.backend (default auto: "
                       "openai when --base-url is given, else vllm when it imports and a GPU is here, else hf)")
        p.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible server serving the model "
                       "(eval.server.base_url); its key is read from $OPENAI_API_KEY (eval.server.api_key_env)")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="merge a trained stage into a Hugging Face model dir (safetensors) for serving",
        description="Export a stage output: a LoRA adapter is merged into its base, a full fine-tune is re-saved "
                    "(or consolidated from its newest ZeRO checkpoint), a NAT teacher (not mergeable: its gate is "
                    "nonlinear) is exported as its neg and pos adapters. Writes sharded safetensors, config, "
                    "tokenizer, generation config and a README card with the training provenance.")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", help="a stage output directory")
    p.add_argument("--output", required=True, metavar="DIR", help="where the model dir goes (must not exist)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weight dtype on disk (default float32)")


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-GPU memory, global batch, steps and communication of stages before launch",
        description="Print, for each stage config, what one GPU will hold (weights, trainable states by "
                    "DeepSpeed's estimators, activations at data.max_tokens with or without gradient "
                    "checkpointing, logits, eval's KV cache, online distill's teacher copy), the global batch, "
                    "steps per epoch (from the prepared data's token lengths) and the communication per step. "
                    "Exits 2 naming the reason when a stage will not fit. slurm/pipeline.sh runs it first.")
    p.add_argument("--config", action="append", required=True, metavar="FILE",
                   help="a stage config; repeat for several. The stage is the file name (pretrain.yaml: sft)")
    p.add_argument("--stage", choices=PLANNED_STAGES,
                   help="the stage, when the file name does not say it")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (= ranks) per node (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory of one GPU in GiB (default 80)")
    p.add_argument("--model-config", metavar="PATH|NAME",
                   help="the model's config.json (or its dir), or a known shape (llama-7b, llama-2-7b, llama-2-13b, "
                        "llama-2-70b, mistral-7b), when model.path is not on this machine and its name is not one")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides, each given to the configs it is for (a run.yaml shared value, or a key of one "
                        "of the config's sections)")


def _add_pipeline_stages(sub) -> None:
    p = sub.add_parser(
        "pipeline-stages", help="(used by slurm/pipeline.sh) every stage's overrides, output dir and paths",
        description="Resolve every stage config of a pipeline directory (its run.yaml shared values and the "
                    "pipeline's overrides), in one process, and write per config NAME.yaml: INTO/NAME.fields "
                    "(NUL-separated: the stage, its engine.output_dir, the overrides that are for it) and "
                    "INTO/NAME.paths (its resolved model, input and output paths); INTO/order lists the names in "
                    "submission order. An override that no stage config of the directory takes is an error.")
    p.add_argument("config_dir", metavar="DIR", help="the pipeline's config directory")
    p.add_argument("--into", metavar="DIR", required=True, help="where the files go (an existing directory)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the pipeline's overrides")


def build_parser() -> argparse.ArgumentParser:
    from train import __version__

    parser = argparse.ArgumentParser(
        prog="tdg", description="Distill reasoning from LLMs with negative data (NAT, NCE, ASC).")
    parser.add_argument("--version", action="version", version=f"tdg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_StageParser)
    _add_prepare(sub)
    _add_demo(sub)
    _add_export(sub)
    _add_plan(sub)
    _add_pipeline_stages(sub)
    for name in STAGES:
        _add_stage(sub, name)
    return parser


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        levels = ()
    if not levels or not all(1 <= x <= 5 for x in levels):
        raise TdgError(f"--pretrain-levels: comma-separated levels from 1 to 5 (e.g. 1,2), got {text!r}")
    return levels


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from train.data.prepare import PrepareOptions, format_stats, prepare

        stats = prepare(PrepareOptions(
            inputs=args.input, output=args.output, grader=args.grader, workers=args.workers,
            on_error=args.on_error, timeout=args.timeout, tokenizer=args.tokenizer, overwrite=args.overwrite,
            prompt_template=args.prompt_template, prompt_format=args.prompt_format, system_prompt=args.system_prompt,
            fields=args.fields, show_progress=not args.no_progress))
        if stats.get("skipped_existing"):
            print(f"{args.output} is already prepared (DONE.json found); pass --overwrite to redo it")
        print(format_stats(stats))
        return 0
    if args.command == "demo":
        from train.stages.demo import run_demo

        run_demo(DemoOptions(output=args.output, questions=args.questions, test_questions=args.test_questions,
                             pretrain_questions=args.pretrain_questions,
                             pretrain_levels=_levels(args.pretrain_levels), pretrain_epochs=args.pretrain_epochs,
                             valid_questions=args.valid_questions,
                             seed=args.seed, workers=args.workers, vocab_size=args.vocab_size, nproc=args.nproc,
                             base=args.base, train_base=args.train_base,
                             ablation=args.ablation, ablation_seeds=args.ablation_seeds,
                             ablation_steps=args.ablation_steps, ablation_questions=args.ablation_questions))
        return 0
    if args.command == "export":
        from train.export import export

        print(export(args.source, args.output, args.max_shard_size, args.dtype))
        return 0
    if args.command == "plan":
        return _plan(args)
    if args.command == "pipeline-stages":
        from train.pipeline import write_stage_files

        write_stage_files(args.config_dir, args.overrides, args.into)
        return 0
    if args.command in STAGES:
        import importlib

        from train import config

        _, module, cls_name = STAGES[args.command]
        overrides = list(args.overrides)
        if args.command == "sample":
            if not (args.output or args.config or any(o.startswith("engine.output_dir=") for o in overrides)):
                raise TdgError("tdg sample: --output DIR is required (where rationales.jsonl is written)")
            overrides = [f"{key}={getattr(args, flag)}" for flag, key in SAMPLE_SHORTCUTS.items()
                         if getattr(args, flag) is not None] + overrides
        if args.command == "score" and args.restart:
            overrides = ["score.restart=true", *overrides]
        if args.command == "eval":
            if args.model and not args.output and not args.config:
                from train.models.hub import is_hub_id

                test_name = os.path.basename(args.test or 'test').split('.')[0]
                model = args.model.rstrip("/")  # a hub id's results go to ./eval-ORG--NAME-TEST, not into the cache
                args.output = f"eval-{model.replace('/', '--')}-{test_name}" if is_hub_id(model) else \
                    f"{model}/eval-{test_name}"
            overrides = [f"{key}={getattr(args, flag)}" for flag, key in EVAL_SHORTCUTS.items()
                         if getattr(args, flag) is not None] + overrides
        cfg = config.load_config(getattr(config, cls_name), args.config, overrides)
        if args.print_key:
            print(config.get_dotted(cfg, args.print_key))
            return 0
        return importlib.import_module(module).main(cfg)
    raise AssertionError(args.command)


def _plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from train import config
    from train.pipeline import config_class
    from train.plan import make_plan

    too_big, used = [], set()
    for file in args.config:
        stage = args.stage or {"pretrain": "sft"}.get(Path(file).stem, Path(file).stem)
        if stage not in STAGES or stage == "ablation":
            raise TdgError(f"{file}: cannot tell the stage from the file name; pass --stage")
        cls = config_class(stage)
        mine = [o for o in args.overrides if config.is_override_for(cls, file, o)]  # optim.lr: not for eval
        used.update(mine)
        plan = make_plan(stage, config.load_config(cls, file, mine), args.nodes, args.gpus_per_node,
                         args.gpu_mem, args.model_config, file, tuple(args.overrides))
        print(plan.render(), flush=True)
        if not plan.fits:
            too_big.append(f"{file} ({stage}): needs {plan.total / 2**30 + 2:.1f} GiB of {args.gpu_mem:g} per GPU")
        too_big += [f"{file} ({stage}): {problem}" for problem in plan.problems]
    unused = [o for o in args.overrides if o not in used]
    if unused:
        raise TdgError(f"overrides for none of the configs: {', '.join(unused)}")
    if too_big:
        raise TdgError("will not run: " + "; ".join(too_big))
    return 0


def entry() -> NoReturn:
    """The `tdg` and `python -m train` commands: a stage's process catches stop signals (`python -m train` from its
    first line, before torch loads) and ends without interpreter finalisation (train.engine.process_exit says
    why)."""
    from train.engine.process_exit import run_then_exit
    from train.engine.signals import catch_stop_signals

    catch_stop_signals(sys.argv)
    run_then_exit(main)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except StageStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_CHECKPOINTED
    except TdgError as e:
        if rank_errors.first_to_report(str(e)):  # once, not once per rank
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if rank_errors.lost_peer_after_failure(e):
            return 1  # another rank failed first and said why: no gloo traceback on top of it
        rank_errors.mark_failed()
        raise
