"""Training step time with the LM head at target positions only (and in chunks), against the head at every
position, on a 32k vocabulary.

Issue 26: prompt and pad positions are about 38% of the tokens of the MATH rationales, and the head gave
each of them full 32k-vocabulary logits. `train.stages.common.token_logprobs` now runs the head at target
positions only; `model.loss_chunk_tokens` also splits them into chunks recomputed in backward (memory, not
speed). All three run in this process on the same model and batches (a LoRA on q/v as the shipped configs
train, fp32 on CPU or bf16 on a GPU), interleaved, median of the timed repeats.

    python bench/lm_head_positions.py [--hidden 512 --layers 4 --rows 4 --length 512 --repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_SHARE = 0.38  # prompt + pad positions of the MATH rationales (issue 26)


def main() -> None:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.common import record
    from train.data.dataset import IGNORE
    from train.stages.common import token_logprobs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=round(2.6875 * args.hidden),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64)
    model = get_peft_model(LlamaForCausalLM(config).to(device, dtype),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, 32000, (args.rows, args.length), device=device)
    labels = ids.clone()
    labels[:, :round(PROMPT_SHARE * args.length)] = IGNORE
    batch = {"input_ids": ids, "labels": labels}

    def every_position() -> torch.Tensor:  # the previous token_logprobs
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE,
                               reduction="sum")

    ways = {"every position": every_position,
            "target positions": lambda: -token_logprobs(model, batch)[0].sum(),
            f"targets in {args.chunk}-position chunks": lambda: -token_logprobs(model, batch, args.chunk)[0].sum()}
    losses = {name: float(fn()) for name, fn in ways.items()}  # warm-up, and the same loss each way
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().backward()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["every position"]
    for name in ways:
        print(f"{name:<34} {median[name] * 1e3:8.1f} ms per forward+backward  ({base / median[name]:.2f}x), "
              f"loss {losses[name]:.4f}")
    if args.no_record:
        return
    dev = torch.cuda.get_device_name() if cuda else None
    what = (f"Llama {args.hidden}x{args.layers}, 32k vocabulary, LoRA q/v, {args.rows} x {args.length} tokens, "
            f"{PROMPT_SHARE:.0%} prompt positions, {'bf16' if cuda else 'fp32'}")
    record(f"LM head at target positions only: forward+backward time (bench/lm_head_positions.py; {what})",
           f"every position {base * 1e3:.0f} ms",
           "; ".join(f"{n} {median[n] * 1e3:.0f} ms ({base / median[n]:.2f}x)" for n in ways if n != "every position"),
           f"{base / median['target positions']:.2f}x", "faster than every position", dev=dev)


if __name__ == "__main__":
    main()
