"""Plain transformers: ``apportion_attention.hf.register()`` registers the attention functions,
and loading apportion's plugins imports only the tiny entry point (never torch)."""

from __future__ import annotations

import json
import subprocess
import sys

# Runs in a fresh interpreter: nothing but ``hf.register()`` may register the names before
# ``from_pretrained`` asks for one.
PLAIN = r"""
import json, sys
from apportion_attention import hf
hf.register()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from apportion.testing.contracts import QUESTION, _long_context
from apportion_attention.longheads import LongHeadsConfig
from apportion_attention.squeezed import SqueezedConfig

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(
    path, attn_implementation="apportion-squeezed", dtype=torch.float32
)
backends = hf.BACKENDS
# small enough settings that the techniques engage on a ~150-token prompt
backends["apportion-squeezed"].config = SqueezedConfig(
    min_context_tokens=32, budget=0.5, kmeans_iters=2
)
backends["apportion-longheads"].config = LongHeadsConfig(chunk_size=16, top_k=2, prefill_block=32)
text = tok.apply_chat_template([{"role": "user", "content": _long_context(6) + "\n\n" + QUESTION}],
                               add_generation_prompt=True, tokenize=False)
ids = tok(text, return_tensors="pt").input_ids
report = {"impl": model.config._attn_implementation, "prompt": ids.shape[1], "new": {}}

def gen(n):
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0, ids.shape[1]:].tolist()

report["new"]["apportion-squeezed"] = gen(4)
report["squeezed_steps"] = int(backends["apportion-squeezed"].stats["steps"])
for name in ("sdpa", "apportion-distattention", "apportion-longheads", "apportion-ssa"):
    model.set_attn_implementation(name)
    report["new"][name] = gen(4)
report["longheads_layers"] = len(backends["apportion-longheads"].last_selection)
print("REPORT " + json.dumps(report))
"""


def test_register_for_plain_transformers():
    from apportion.host.model import converted_embedded

    folder = converted_embedded()
    out = subprocess.run(
        [sys.executable, "-c", PLAIN, str(folder)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("REPORT "))
    rep = json.loads(line[len("REPORT ") :])
    assert rep["impl"] == "apportion-squeezed" and rep["prompt"] > 100
    for name, toks in rep["new"].items():
        assert len(toks) == 4, (name, toks)
    assert rep["squeezed_steps"] > 0  # decode went through the centroid lookup
    assert rep["longheads_layers"] > 0  # heads selected chunks
    # micro-attention merged by LSE is exact: greedy tokens as SDPA's
    assert rep["new"]["apportion-distattention"] == rep["new"]["sdpa"]


def test_ape_and_infiniretri_are_not_registered():
    # their technique lives in the host's prefill; outside it they would be plain SDPA
    from apportion_attention import hf
    from transformers import AttentionInterface

    hf.register()

    names = set(AttentionInterface._global_mapping)
    assert {
        "apportion-squeezed",
        "apportion-longheads",
        "apportion-distattention",
        "apportion-ssa",
    } <= names
    assert set(hf.BACKENDS) >= {"apportion-squeezed", "apportion-ssa"}
    assert not {"apportion-ape", "apportion-infiniretri"} & set(hf.BACKENDS)


def test_loading_plugins_imports_only_the_entry_point():
    # the entry point runs the package's __init__, which is tiny: no backend module, no torch
    code = (
        "import sys, apportion.plugins as p\nhost = p.get_plugin_host()\n"
        "info = {x.name: x for x in host.plugins}['attention']\n"
        "mods = sorted(m for m in sys.modules if m.startswith('apportion_attention'))\n"
        "print(info.module, info.error, ','.join(mods), 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [
        "apportion_attention.plugin",
        "None",
        "apportion_attention,apportion_attention.plugin",
        "False",
    ], out


def test_the_host_restores_the_registered_function(smollm2):
    # the host installs its own instance under the same name for a generation, then puts
    # back the one `hf.register()` registered for plain transformers
    from apportion.host import Host
    from apportion_attention import hf
    from apportion_attention.squeezed import Squeezed
    from transformers import AttentionInterface

    hf.register()

    seen = []

    class Watch(Squeezed):
        def _attend(self, module, *args, **kwargs):
            seen.append(AttentionInterface._global_mapping["apportion-squeezed"])
            return super()._attend(module, *args, **kwargs)

    watch = Watch()
    Host(smollm2, watch).generate("Say hello.", max_new_tokens=2)
    assert seen and seen[0] == watch.attention_function()
    restored = AttentionInterface._global_mapping["apportion-squeezed"]
    assert restored == hf.BACKENDS["apportion-squeezed"].attention_function() != seen[0]
