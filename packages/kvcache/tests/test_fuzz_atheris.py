"""The CacheGen decoder under libFuzzer (atheris), when atheris installs on this Python.

Hypothesis fuzzes the decoder in ``test_cachegen.py``; this adds coverage-guided mutation from
valid seed streams, in a subprocess so that a crash or an oversized allocation
(``-rss_limit_mb``) fails the test instead of the test run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGET = Path(__file__).parent / "fuzz" / "fuzz_cachegen.py"


@pytest.mark.xfail(
    reason="open finding, CI dry run 2026-11-29 (-seed=1): an input grew the decoder's RSS to "
    "5 GB, past -rss_limit_mb=3072; not yet reduced (a local 51k-run session stayed at 577 MB)",
    strict=False,
)
def test_decoder_survives_coverage_guided_fuzzing(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    subprocess.run([sys.executable, str(TARGET), "--seed", str(corpus)], check=True, timeout=120)
    out = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            str(corpus),
            "-runs=200000",
            "-max_total_time=20",
            "-rss_limit_mb=3072",
            "-timeout=20",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, tail
    assert "Done" in tail or "INFO: " in tail
