"""The ``apportion`` model in lm-evaluation-harness, against lm-eval's own ``hf`` model on a
task defined in local YAML over local JSON: a generation task scored by exact match and a
multiple-choice task scored by log-likelihood, 20 items each."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

lm_eval = pytest.importorskip("lm_eval")

from apportion.errors import ConfigError, UnknownComponentError  # noqa: E402
from apportion_eval.lm_eval_adapter import ApportionLM, register, resolve_args  # noqa: E402

TASKS = ["apportion_niah_gen", "apportion_niah_mc"]
_RUNS: dict[str, Any] = {}


def evaluate(model: str, model_args: str, task_dir: Any) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    key = f"{model}:{model_args}"
    if key not in _RUNS:
        register()
        _RUNS[key] = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=TASKS,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            device="cpu",
            batch_size=1,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=0,
        )
        from lm_eval.utils import make_table

        print(f"\n=== {model} ({model_args})\n{make_table(_RUNS[key])}")
    return _RUNS[key]


def samples(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def choice_logliks(sample: dict[str, Any]) -> list[float]:
    return [float(r[0][0]) for r in sample["resps"]]


def generation(sample: dict[str, Any]) -> str:
    return str(sample["filtered_resps"][0])


@pytest.fixture(scope="module")
def hf(task_dir, model_dir):
    return evaluate("hf", f"pretrained={model_dir},dtype=float32", task_dir)


@pytest.fixture(scope="module")
def full(task_dir):
    return evaluate("apportion", "model=smollm2,kv_policy=full,attention=dense", task_dir)


@pytest.fixture(scope="module")
def compressed(task_dir):
    return evaluate("apportion", "model=smollm2,kv_policy=snapkv,compression_ratio=0.5", task_dir)


def test_loglikelihood_matches_hf_with_the_full_cache(hf, full):
    """Every choice's log-likelihood as lm-eval's ``hf`` model computes it (the context is
    prefilled, then the continuation fed: float rounding only), so the same accuracy."""
    ours, theirs = samples(full, TASKS[1]), samples(hf, TASKS[1])
    assert len(ours) == len(theirs) == 20
    for a, b in zip(ours, theirs, strict=True):
        assert a["doc_id"] == b["doc_id"]
        assert choice_logliks(a) == pytest.approx(choice_logliks(b), abs=2e-3)
        assert a["acc"] == b["acc"], a["doc_id"]
    assert full["results"][TASKS[1]]["acc,none"] == hf["results"][TASKS[1]]["acc,none"]


def test_generation_matches_hf_with_the_full_cache(hf, full):
    ours, theirs = samples(full, TASKS[0]), samples(hf, TASKS[0])
    assert [generation(s) for s in ours] == [generation(s) for s in theirs]
    assert full["results"][TASKS[0]] == hf["results"][TASKS[0]]


def test_compressing_policy_runs_the_same_tasks(hf, full, compressed):
    """SnapKV at 0.5 through lm-eval: every item answered and scored; the comparison table is
    printed for the record."""
    ref_gen = [generation(s) for s in samples(hf, TASKS[0])]
    ref_mc = [s["acc"] for s in samples(hf, TASKS[1])]
    rows = []
    for name, res in (
        ("lm-eval hf (full cache)", hf),
        ("apportion full", full),
        ("apportion snapkv@0.5", compressed),
    ):
        gen = res["results"][TASKS[0]]["exact_match,none"]
        acc = res["results"][TASKS[1]]["acc,none"]
        same_gen = sum(
            generation(s) == r for s, r in zip(samples(res, TASKS[0]), ref_gen, strict=True)
        )
        same_mc = sum(s["acc"] == r for s, r in zip(samples(res, TASKS[1]), ref_mc, strict=True))
        rows.append(
            f"| {name:<23} | {gen:>15.2f} | {same_gen:>5}/20 | {acc:>10.2f} | {same_mc:>5}/20 |"
        )
    print(
        "\n| model                   | gen exact_match | gen = hf | mc acc     | mc = hf  |\n"
        "|-------------------------|-----------------|----------|------------|----------|\n"
        + "\n".join(rows)
    )
    assert len(samples(compressed, TASKS[0])) == len(samples(compressed, TASKS[1])) == 20
    # the compressed context changes the scores: the policy really ran
    diffs = [
        choice_logliks(a) != choice_logliks(b)
        for a, b in zip(samples(compressed, TASKS[1]), samples(full, TASKS[1]), strict=True)
    ]
    assert any(diffs)


def test_registered_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    register()
    register()  # again: a no-op
    assert get_model("apportion") is ApportionLM
    assert get_model("hf").__name__ == "HFLM"


# ----------------------------------------------------------------------------- bad input


def test_unknown_component_is_the_registrys_one_line_error():
    with pytest.raises(UnknownComponentError, match="Did you mean 'qspan'") as err:
        resolve_args({"kv_policy": "qspn"})
    assert "\n" not in str(err.value)
    register()
    with pytest.raises(UnknownComponentError, match="unknown attention 'squeezd'"):
        lm_eval.simple_evaluate(model="apportion", model_args="attention=squeezd", tasks=TASKS)


def test_unknown_or_bad_option_fails_in_one_line():
    with pytest.raises(ConfigError, match="Did you mean 'compression_ratio'") as err:
        resolve_args({"kv_policy": "qspan", "compresion_ratio": 0.5})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"kv_policy\.compression_ratio") as err:
        resolve_args({"kv_policy": "qspan", "kv_policy.compression_ratio": 1.5})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model_args.*'window'"):
        resolve_args({"window": 3})


def test_options_go_to_their_component():
    got = resolve_args({"kv_policy": "qspan", "compression_ratio": 0.25, "model": "smollm2"})
    assert got["names"]["kv_policy"] == "qspan"
    assert got["configs"]["kv_policy"].compression_ratio == 0.25
    assert got["model"].name == "smollm2"


def test_cli_one_liner(task_dir, model_dir):
    """``python -m apportion_eval.lm_eval_adapter`` is lm_eval's command line with apportion
    registered; a bad argument is one line on stderr and status 2."""
    base = [sys.executable, "-m", "apportion_eval.lm_eval_adapter", "--model", "apportion"]
    tail = ["--tasks", TASKS[1], "--include_path", str(task_dir), "--device", "cpu"]
    bad = subprocess.run(
        [*base, "--model_args", "kv_policy=qspn", *tail], capture_output=True, text=True
    )
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "Did you mean 'qspan'" in bad.stderr.strip().splitlines()[-1]
    ok = subprocess.run(
        [*base, "--model_args", "kv_policy=qspan,compression_ratio=0.5", *tail, "--limit", "2"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "apportion_niah_mc" in ok.stdout and "acc" in ok.stdout
    print(ok.stdout[-1500:])


def test_sampling_is_refused():
    from lm_eval.api.instance import Instance

    lm = ApportionLM(model="smollm2", device="cpu")
    req = Instance("generate_until", {}, ("Say hi.", {"do_sample": True, "until": ["\n"]}), 0)
    with pytest.raises(ConfigError, match="greedily"):
        lm.generate_until([req])
