"""HoPE vs RoPE, dynamic NTK and YaRN at 1x..4x SmolLM2's trained length (JSON lines).

For each length and sample, one niah prompt (core generator) is read once per method with
the method's rotary embedding installed: perplexity over the last ``--ppl-tokens`` context
tokens (before the question) and the niah answer (greedy, ``--new-tokens``). All methods see
the same prompts in the same run.

    uv run --no-sync python benchmarks/attention_hope.py --lengths 8192 16384 32768 --samples 1

On a 2-core CPU a 16K prompt takes many minutes per method; ``--lengths`` smaller than the
trained window (e.g. 1024 2048) gives a quick in-window comparison only.
``--hope-zero-threshold 1`` applies the paper's zeroing rule instead of the zero-shot default
(16; see :mod:`apportion_attention.hope` for why the paper's rule collapses untrained).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from apportion.baselines.niah import NeedleConfig, SingleNeedle
from apportion.host import load_model
from apportion.host.kv import cache_kwargs
from apportion_attention.hope import HoPE, HoPEConfig
from apportion_attention.rope_scaling import DynamicNTK, RotaryPlugin, YaRN

METHODS = {"rope": RotaryPlugin, "rope-ntk": DynamicNTK, "rope-yarn": YaRN, "hope": HoPE}


@torch.inference_mode()
def run_one(
    loaded,
    plugin: RotaryPlugin,
    context_ids: list[int],
    tail_ids: list[int],
    ppl_tokens: int,
    new_tokens: int,
) -> tuple[float, str]:
    from transformers import DynamicCache

    model = loaded.model
    ids = torch.tensor([context_ids + tail_ids])
    plugin.seq_len = ids.shape[-1]
    cache = DynamicCache(config=model.config)
    with plugin.installed(model):
        hidden = model.model(
            input_ids=ids,
            position_ids=torch.arange(ids.shape[-1])[None],
            use_cache=True,
            **cache_kwargs(model.model, cache),
        ).last_hidden_state
        n_ctx = len(context_ids)
        lo = max(1, n_ctx - ppl_tokens)
        logits = model.lm_head(hidden[0, lo - 1 : n_ctx - 1]).float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, lo:n_ctx])
        logits = model.lm_head(hidden[:, -1]).float()
        out, pos = [], ids.shape[-1]
        for _ in range(new_tokens):
            nxt = int(logits.argmax(-1))
            if nxt == loaded.tokenizer.eos_token_id:
                break
            out.append(nxt)
            step = model(
                input_ids=torch.tensor([[nxt]]),
                position_ids=torch.tensor([[pos]]),
                use_cache=True,
                **cache_kwargs(model, cache),
            )
            logits, pos = step.logits[:, -1].float(), pos + 1
    return math.exp(float(nll)), loaded.tokenizer.decode(out, skip_special_tokens=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--ppl-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--hope-zero-threshold",
        type=float,
        default=None,
        help="HoPE zeroes frequencies with wavelength > this many windows (default: the plugin's)",
    )
    args = ap.parse_args()

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    window = loaded.max_context
    results: dict[str, dict[int, dict[str, list[float]]]] = {m: {} for m in args.methods}
    bench = SingleNeedle(NeedleConfig(lengths=args.lengths, depths=[0.5], samples=args.samples))
    for s in bench.samples(tok):
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"{s.context}\n\n{s.question}"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        split = text.rfind(s.question)
        context_ids = tok.encode(text[:split], add_special_tokens=False)
        tail_ids = tok.encode(text[split:], add_special_tokens=False)
        for m in args.methods:
            t0 = time.perf_counter()
            plugin = (
                HoPE(HoPEConfig(zero_threshold=args.hope_zero_threshold))
                if m == "hope" and args.hope_zero_threshold is not None
                else METHODS[m]()
            )
            ppl, answer = run_one(
                loaded, plugin, context_ids, tail_ids, args.ppl_tokens, args.new_tokens
            )
            ok = s.answers[0] in answer.replace(",", "")
            slot = results[m].setdefault(s.length, {"ppl": [], "niah": []})
            slot["ppl"].append(ppl)
            slot["niah"].append(float(ok))
            print(
                json.dumps(
                    {
                        "method": m,
                        "length": s.length,
                        "x_window": round(s.length / window, 2),
                        "sample": s.id,
                        "ppl": ppl,
                        "niah_correct": ok,
                        "answer": answer[:60],
                        "seconds": time.perf_counter() - t0,
                    }
                ),
                flush=True,
            )

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    table = {
        m: {str(n): {"ppl": mean(v["ppl"]), "niah": mean(v["niah"])} for n, v in per.items()}
        for m, per in results.items()
    }
    past = [n for n in args.lengths if n > window]
    verdict = None
    if past and "hope" in table and "rope" in table:
        verdict = all(
            table["hope"][str(n)]["ppl"] <= table["rope"][str(n)]["ppl"]
            and table["hope"][str(n)]["niah"] >= table["rope"][str(n)]["niah"]
            for n in past
        )
    print(
        json.dumps(
            {
                "summary": True,
                "benchmark": "attention_hope",
                "window": window,
                "lengths": args.lengths,
                "samples": args.samples,
                "results": table,
                "hope_config": (
                    HoPEConfig()
                    if args.hope_zero_threshold is None
                    else HoPEConfig(zero_threshold=args.hope_zero_threshold)
                ).model_dump(),
                "targets": {
                    "hope_vs_rope_past_window": (
                        "ppl <= rope and niah >= rope at every length > window"
                    )
                },
                "met": {"hope_vs_rope_past_window": verdict},
                "note": None
                if past
                else "no length past the trained window was measured: the target is not assessed",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
