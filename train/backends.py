"""Where rationales are generated: Hugging Face `generate` in this process, or an OpenAI-compatible server.

Both take the same questions and the same `Prompt` (template, format, system prompt), so a
rationale sampled through a server is prompted exactly as one sampled in-process:

- `hf`: the model (any stage output `train.generation.load_generator` takes: exported, LoRA,
  full fine-tune, NAT teacher) on this rank's device; data-parallel under torchrun/srun.
- `openai`: any OpenAI-compatible endpoint (vLLM's or SGLang's server, TGI, a commercial API)
  through the official `openai` client. Plain prompts go to the completions endpoint as text;
  chat prompts go to chat completions as messages, so the server applies its own chat template.
  Requests run `concurrency` at a time; 429, 5xx, timeouts, dropped connections and malformed
  responses are retried with exponential backoff, `max_retries` times, then given up and reported.
  The API key is read from the environment variable `api_key_env`, never from a config file, and
  is never printed.

- `vllm`: vLLM in this process, for a plain model directory (an export, a merged student):
  n completions per prompt in one request, tensor-parallel over `vllm.tensor_parallel_size`
  GPUs, data-parallel under torchrun/srun with each rank's engine on its own GPUs (`vllm_gpus`).
  The prompts are our token ids, so they are exactly the `hf` prompts. NOT YET RUN on a
  GPU (none was available to this project's sessions); `auto` picks it only when vLLM imports
  and CUDA is present.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from train.config import ServerSection
from train.data.prompt import Prompt
from train.errors import ConfigError
from train.generation import Generated


@dataclass
class Sampled:
    """The n completions of one question (or why it was given up on)."""

    texts: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # ended by the model (EOS / finish_reason stop)
    error: str = ""  # non-empty: every attempt failed; the last reason


@dataclass
class SamplingSettings:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int


class HFBackend:
    """Hugging Face generate on one device; `generate`/`sample` take a batch of questions."""

    def __init__(self, model: str, device, dtype, prompt: Prompt | None, budget_tokens: int = 0,
                 attn_implementation: str = "sdpa"):
        from train.data.prompt import recorded_prompt
        from train.generation import generation_budget, load_generator

        self.model, self.tokenizer, self.what = load_generator(model, device, dtype, attn_implementation)
        self.prompt = prompt or recorded_prompt(model) or Prompt()
        self.device, self.dtype = device, dtype
        self.budget = generation_budget(budget_tokens, self.model.config, dtype, device)

    def generate(self, questions: list[str], s: SamplingSettings, greedy: bool = True) -> Generated:
        from train.generation import generate_rationales

        return generate_rationales(self.model, self.tokenizer, questions, self.prompt, s.n, s.temperature, s.top_p,
                                   s.max_new_tokens, s.seed, self.device, self.budget, greedy=greedy)

    def sample(self, questions: list[str], s: SamplingSettings, seeds: list[int] | None = None) -> list[Sampled]:
        """One generate call for the batch: it draws from one seed, the first question's."""
        gen = self.generate(questions, replace(s, seed=seeds[0]) if seeds else s, greedy=False)
        return [Sampled(texts, finished) for texts, finished in zip(gen.samples, gen.finished, strict=True)]


class VLLMBackend:
    """vLLM on this node's GPUs (tensor-parallel); prompts as token ids from our own Prompt."""

    def __init__(self, model: str, prompt: Prompt | None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, seed: int = 0):
        from train.data.prompt import recorded_prompt
        from train.data.tokenizer import load_tokenizer
        from train.engine import distributed as dist_

        if not (Path(model) / "config.json").is_file():
            raise ConfigError(f"backend vllm serves model directories only, and {model} is not one (a LoRA, full "
                              "fine-tune or NAT stage output): export it with `tdg export`, or use backend hf")
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError("backend vllm needs vLLM on a GPU node: pip install 'tdg-trainer[vllm]'") from None
        self.tokenizer = load_tokenizer(model)
        self.prompt = prompt or recorded_prompt(model) or Prompt()
        if dist_.world() > 1:  # data-parallel: this rank's engine on this rank's GPUs
            os.environ["CUDA_VISIBLE_DEVICES"] = vllm_gpus(tensor_parallel_size)
        import torch

        if torch.cuda.is_available():  # eval's ranker is already on this GPU
            free, total = torch.cuda.mem_get_info()
            share = vllm_memory_share(gpu_memory_utilization, free, total)
            if share < gpu_memory_utilization:
                print(f"[vllm] gpu_memory_utilization {gpu_memory_utilization:g} -> {share:.2f}: "
                      f"{(total - free) / 2**30:.1f} GiB of the GPU is already taken (the ranker)", flush=True)
            gpu_memory_utilization = share
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, seed=seed,
                       gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=False)
        self.what = f"{model} (vLLM, tensor-parallel {tensor_parallel_size})"

    def _run(self, questions: list[str], n: int, temperature: float, s: SamplingSettings) -> list[Sampled]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from train.data.dataset import prompt_ids

        params = SamplingParams(n=n, temperature=temperature, top_p=s.top_p if temperature > 0 else 1.0,
                                max_tokens=s.max_new_tokens, seed=s.seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids)
                                  for ids in prompt_ids(self.tokenizer, questions, self.prompt)], params,
                                 use_tqdm=False)
        return [Sampled([c.text for c in o.outputs], [c.finish_reason == "stop" for c in o.outputs]) for o in outs]

    def generate(self, questions: list[str], s: SamplingSettings, greedy: bool = True) -> Generated:
        sampled = self._run(questions, s.n, s.temperature, s) if s.n else [Sampled() for _ in questions]
        first = self._run(questions, 1, 0.0, s) if greedy else [Sampled([""], [True]) for _ in questions]
        return Generated([g.texts[0] for g in first], [x.texts for x in sampled], [x.finished for x in sampled],
                         greedy_finished=[g.finished[0] for g in first])

    def sample(self, questions: list[str], s: SamplingSettings, seeds: list[int] | None = None) -> list[Sampled]:
        return self._run(questions, s.n, s.temperature, s)


def vllm_memory_share(configured: float, free: int, total: int, slack: float = 0.03) -> float:
    """vLLM's gpu_memory_utilization for a GPU that already holds `total - free` bytes (eval's ranker).
    vLLM reads it as a share of the whole GPU and refuses to start when less than that is free, so ask for
    what is free, less `slack` (the CUDA context vLLM's own process adds), never more than `configured`."""
    share = min(configured, free / total - slack)
    if share < 0.2:
        raise ConfigError(f"vllm.gpu_memory_utilization: only {free / 2**30:.1f} of {total / 2**30:.1f} GiB is free "
                          "on the GPU once the ranker is loaded (or another process holds it), too little for vLLM; "
                          "use backend hf or a GPU with more memory")
    return share


def vllm_gpus(tensor_parallel_size: int, env: dict[str, str] | None = None, device_count: int | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for this rank's vLLM engine when several ranks share a node (torchrun, srun).

    vLLM places its engine on the first visible GPUs, so without this every rank would load onto GPU 0.
    Local rank r takes GPUs [r*tp, (r+1)*tp) of those visible. A task that already sees exactly tp GPUs
    (srun binding GPUs per task) keeps them."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        visible = [d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    else:
        if device_count is None:
            import torch

            device_count = torch.cuda.device_count()
        visible = [str(i) for i in range(device_count)]
    tp = tensor_parallel_size
    if len(visible) == tp:
        return ",".join(visible)
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or local_rank + 1)
    if local_world * tp > len(visible):
        raise ConfigError(f"backend vllm: {local_world} ranks on this node x vllm.tensor_parallel_size={tp} need "
                          f"{local_world * tp} GPUs, and {len(visible)} are visible ({','.join(visible) or 'none'}): "
                          "launch one rank per tensor_parallel_size GPUs (e.g. torchrun --nproc_per_node "
                          f"{max(len(visible) // tp, 1)})")
    return ",".join(visible[local_rank * tp:(local_rank + 1) * tp])


def is_served(backend: str, base_url: str) -> bool:
    """The model is a name on a server (backend openai, or auto with a server URL), not a path on this machine."""
    return backend == "openai" or (backend == "auto" and bool(base_url))


def choose_backend(backend: str, base_url: str, model: str) -> str:
    """`auto`: a server when one is given, else vLLM when it can serve this model here, else Hugging Face."""
    if is_served(backend, base_url):
        return "openai"
    if backend != "auto":
        return backend
    return "vllm" if vllm_usable() and (Path(model) / "config.json").is_file() else "hf"


def gather_failures(failures: dict[str, str], out: Path) -> dict[str, str]:
    """Collective: every rank's failed questions (qid -> why), listed by rank 0 in out/failures.json; with none,
    a failures.json of an earlier run is removed."""
    from train.engine import distributed as dist_

    failures = {k: v for part in dist_.all_gather_object(failures) for k, v in part.items()}
    listed = out / "failures.json"
    if dist_.is_main():
        if failures:
            listed.write_text(json.dumps(failures, indent=1))
        else:
            listed.unlink(missing_ok=True)
    return failures


def raise_if_gave_up(failures: dict[str, str], out: Path, total: int, max_retries: int) -> None:
    """Collective: if any rank gave up on a question, every rank raises naming out/failures.json (none is left
    waiting in a collective)."""
    from train.errors import TdgError

    failures = gather_failures(failures, out)
    listed = out / "failures.json"
    if failures:
        raise TdgError(f"{out}: gave up on {len(failures)} of {total} questions after {max_retries} retries each "
                       f"(first: {next(iter(failures.values()))}); every one is in {listed}; the others are "
                       "saved, and a rerun asks again for these only")


def make_backend(name: str, model: str, prompt: Prompt, device, dtype, server: ServerSection, vllm,
                 max_batch_tokens: int = 0, attn_implementation: str = "sdpa", seed: int = 0):
    """The backend `name` (from choose_backend) for sample or eval, with the settings of their sections."""
    if name == "openai":
        return OpenAIBackend(server, model, prompt)
    if name == "vllm":
        return VLLMBackend(model, prompt, vllm.tensor_parallel_size, vllm.gpu_memory_utilization, seed)
    return HFBackend(model, device, dtype, prompt, max_batch_tokens, attn_implementation)


def vllm_usable() -> bool:
    """vLLM imports and a CUDA GPU is here (what backend auto needs to choose it)."""
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


class OpenAIBackend:
    """An OpenAI-compatible server; `sample` sends one request per question, `concurrency` at a time."""

    def __init__(self, server: ServerSection, model: str, prompt: Prompt, log: Callable[[str], None] = print):
        try:
            import openai
        except ImportError:
            raise ConfigError("sample.backend=openai needs the openai client: pip install 'tdg-trainer[openai]'") \
                from None
        self.openai = openai
        key = os.environ.get(server.api_key_env) or "EMPTY"  # local servers (vLLM, SGLang) take any key
        # retries are ours (counted, reported, with our backoff), not the client's silent ones
        self.client = openai.OpenAI(base_url=server.base_url or None, api_key=key, max_retries=0,
                                    timeout=server.timeout)
        self.model, self.prompt, self.concurrency = model, prompt, server.concurrency
        self.max_retries, self.backoff, self.log = server.max_retries, server.backoff, log
        self.retries = 0  # attempts that failed and were retried, over the run
        self._lock = threading.Lock()

    tokenizer = None  # the server's own

    @property
    def what(self) -> str:
        return f"{self.model} at {self.client.base_url}"

    def generate(self, questions: list[str], s: SamplingSettings, greedy: bool = True) -> Generated:
        """Eval's requests: the greedy rationale (temperature 0, one completion) and n sampled ones."""
        seeds = [s.seed + k for k in range(len(questions))]
        sampled = self.sample(questions, s, seeds) if s.n else [Sampled() for _ in questions]
        first = self.sample(questions, SamplingSettings(1, 0.0, 1.0, s.max_new_tokens, s.seed), seeds) if greedy \
            else [Sampled([""], [True]) for _ in questions]
        failed = [g.error or x.error for g, x in zip(first, sampled, strict=True)]
        return Generated([g.texts[0] if g.texts else "" for g in first], [x.texts for x in sampled],
                         [x.finished for x in sampled], failed,
                         greedy_finished=[g.finished[0] if g.finished else True for g in first])

    def sample(self, questions: list[str], s: SamplingSettings, seeds: list[int] | None = None) -> list[Sampled]:
        seeds = seeds or [s.seed] * len(questions)
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda qs: self._one(qs[0], s, qs[1]), zip(questions, seeds, strict=True)))

    def _request(self, question: str, s: SamplingSettings, seed: int) -> Sampled:
        common = {"model": self.model, "n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                  "max_tokens": s.max_new_tokens, "seed": seed}
        from train.data.prompt import render_prompt

        user = render_prompt(self.prompt.prompt_template, question)
        if self.prompt.prompt_format == "chat":
            messages = ([{"role": "system", "content": self.prompt.system_prompt}] if self.prompt.system_prompt
                        else []) + [{"role": "user", "content": user}]
            r = self.client.chat.completions.create(messages=messages, **common)
            texts = [c.message.content for c in r.choices]
        else:
            r = self.client.completions.create(prompt=user, **common)
            texts = [c.text for c in r.choices]
        if len(r.choices) > s.n or (s.n == 1 and not r.choices) or any(not isinstance(t, str) for t in texts):
            raise ValueError(f"the server returned {len(r.choices)} completions, {s.n} asked for")
        finished = [c.finish_reason == "stop" for c in r.choices]
        while len(texts) < s.n:  # a server that caps n (or ignores it): the rest one completion per request
            more = self._request(question, replace(s, n=1), seed + len(texts))
            texts, finished = texts + more.texts, finished + more.finished
        return Sampled(texts, finished)

    def _one(self, question: str, s: SamplingSettings, seed: int) -> Sampled:
        o = self.openai
        retryable = (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError,
                     o.APIResponseValidationError, ValueError)  # ValueError: malformed JSON or too few choices
        for attempt in range(self.max_retries + 1):
            try:
                return self._request(question, s, seed)
            except retryable as e:
                reason = f"{type(e).__name__}: {str(e)[:200]}"
            except o.APIStatusError as e:  # other 4xx: the request itself is wrong, retrying cannot help
                return Sampled(error=f"{type(e).__name__} (HTTP {e.status_code}): {str(e)[:200]}")
            if attempt < self.max_retries:
                with self._lock:
                    self.retries += 1
                delay = self.backoff * 2**attempt * (0.5 + random.random())
                self.log(f"[sample] retry {attempt + 1}/{self.max_retries} in {delay:.1f} s after {reason}")
                time.sleep(delay)
        return Sampled(error=reason)
