"""Core start-up costs: `apportion plugins` wall time (torch never imported) and model load
from the safetensors cache, against loading the embedded GGUF directly (the baseline the
cache exists to beat), all measured in this run.

    uv run python benchmarks/core_startup.py [--repeats 5]

Prints JSON lines, the last one with "summary": true.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

LOAD_SNIPPET = r"""
import json, time, sys
t0 = time.perf_counter()
import torch, transformers  # noqa: F401  (import cost reported apart from load cost)
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
mode = sys.argv[1]
if mode == "cache":
    from apportion.host import load_model
    t2 = time.perf_counter()
    loaded = load_model("smollm2")
    t3 = time.perf_counter()
else:
    from apportion.host.model import embedded_gguf
    gguf = embedded_gguf()
    t2 = time.perf_counter()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t3 - t2}))
"""


def plugins_wall(repeats: int) -> tuple[list[float], bool]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "apportion.cli", "plugins", "--json"],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - t0)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nsys.argv=['apportion','plugins','--json']\n"
            "from apportion.cli import main\nmain()\nprint('TORCH', 'torch' in sys.modules)",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return times, "TORCH False" in probe


def load(mode: str) -> dict:
    out = (
        subprocess.run(
            [sys.executable, "-c", LOAD_SNIPPET, mode], check=True, capture_output=True, text=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    times, torch_free = plugins_wall(args.repeats)
    for t in times:
        print(json.dumps({"measure": "apportion plugins --json", "wall_s": round(t, 4)}))
    load("cache")  # make sure the cache exists (first run converts)
    cache = [load("cache") for _ in range(max(1, args.repeats // 2))]
    gguf = load("gguf")
    for c in cache:
        print(
            json.dumps(
                {
                    "measure": "load smollm2 from safetensors cache",
                    **{k: round(v, 3) for k, v in c.items()},
                }
            )
        )
    print(
        json.dumps(
            {
                "measure": "load smollm2 from GGUF (baseline)",
                **{k: round(v, 3) for k, v in gguf.items()},
            }
        )
    )
    cache_load = statistics.median(c["load_s"] for c in cache)
    print(
        json.dumps(
            {
                "summary": True,
                "plugins_wall_s_median": round(statistics.median(times), 4),
                "plugins_torch_free": torch_free,
                "cache_load_s_median": round(cache_load, 3),
                "gguf_load_s": round(gguf["load_s"], 3),
                "cache_speedup_vs_gguf": round(gguf["load_s"] / cache_load, 2),
                "targets": {
                    "plugins_wall_s": "< 0.5",
                    "plugins_torch_free": True,
                    "cache_load_s": "<= 3",
                },
                "met": {
                    "plugins_wall_s": statistics.median(times) < 0.5,
                    "plugins_torch_free": torch_free,
                    "cache_load_s": cache_load <= 3.0,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
