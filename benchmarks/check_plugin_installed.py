"""Used by ``nox -s build``: assert that plugin FAMILY is discovered, healthy, and that
listing plugins did not import torch. Prints one JSON line."""

import json
import subprocess
import sys
import time

family = sys.argv[1]
t0 = time.perf_counter()
out = subprocess.run(
    [sys.executable, "-m", "apportion.cli", "plugins", "--json"],
    check=True,
    capture_output=True,
    text=True,
).stdout
wall = time.perf_counter() - t0
report = {p["name"]: p for p in json.loads(out)}
assert family in report, f"plugin {family!r} not discovered: {sorted(report)}"
assert report[family]["error"] is None, report[family]["error"]
probe = subprocess.run(
    [
        sys.executable,
        "-c",
        "import sys, apportion.plugins as p; p.get_registry(); print('torch' in sys.modules)",
    ],
    check=True,
    capture_output=True,
    text=True,
)
assert probe.stdout.strip() == "False", "loading plugins imported torch"
print(
    json.dumps(
        {
            "plugin": family,
            "ok": True,
            "components": report[family]["components"],
            "plugins_wall_s": round(wall, 3),
        }
    )
)
