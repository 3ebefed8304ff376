"""The XRPO rollout allocator alone, in a simulation with known per-prompt difficulties.

Each prompt has a true success rate ``p`` drawn from a U-shaped Beta(a, a) (most prompts of a
real RL set are nearly always or nearly never solved); a rollout succeeds with probability
``p`` (reward 1, else 0). A group is *informative* when its rewards are not all equal (its
GRPO advantages are not all zero). Every arm draws prompts from the same stream and spends the
same total number of rollouts; we count informative groups per rollout.

Arms: ``uniform-16`` (the baseline: 16 rollouts per prompt), ``uniform-8`` and ``uniform-4``
(smaller fixed groups: shows how much of the gain is the group size alone), and ``xrpo``
(``budget_per_prompt`` rollouts per prompt on average, handed out by
:meth:`apportion_rl.xrpo.XRPO.allocate_rollouts` in phases from each batch's budget).

    uv run --no-sync python benchmarks/rl_allocator_sim.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def informative(rewards: list[float]) -> bool:
    return len(set(rewards)) > 1


def run_uniform(group: int, total: int, batch: int, stream) -> dict:
    spent = groups = info = 0
    while spent + group * batch <= total:
        for _ in range(batch):
            p = next(stream)
            rewards = [float(random.random() < p) for _ in range(group)]
            spent += group
            groups += 1
            info += informative(rewards)
    return {"rollouts": spent, "groups": groups, "informative": info}


def run_xrpo(total: int, batch: int, per_prompt: int, stream, options: dict) -> dict:
    from apportion_rl.xrpo import XRPO, XRPOConfig

    s = XRPO(XRPOConfig(**options))
    spent = groups = info = 0
    sizes: list[int] = []
    budget = per_prompt * batch
    while spent + budget <= total:
        ps = [next(stream) for _ in range(batch)]

        def sample(counts, ps=ps):
            return [
                [float(random.random() < p) for _ in range(c)]
                for p, c in zip(ps, counts, strict=True)
            ]

        got = s.collect(batch, budget, sample)
        for g in got:
            spent += len(g)
            groups += 1
            info += informative(g)
            sizes.append(len(g))
    return {
        "rollouts": spent,
        "groups": groups,
        "informative": info,
        "mean_group": sum(sizes) / len(sizes),
        "max_group": max(sizes),
        "min_group": min(sizes),
    }


def stream_of(seed: int, a: float):
    rng = random.Random(seed)
    while True:
        yield rng.betavariate(a, a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=65536, help="total rollouts per arm")
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch")
    ap.add_argument("--beta", type=float, default=0.5, help="a of the Beta(a, a) difficulty prior")
    ap.add_argument("--budget-per-prompt", type=int, default=8, help="xrpo's mean group size")
    ap.add_argument("--initial", type=int, default=4)
    ap.add_argument("--phases", type=int, default=2)
    ap.add_argument("--exploration", type=float, default=0.05)
    ap.add_argument(
        "--prior-variance", type=float, default=None, help="xrpo's v0 (default: its config's)"
    )
    ap.add_argument(
        "--prior-strength", type=float, default=None, help="xrpo's m0 (default: its config's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args(argv)

    results = {}
    for name in ("uniform-16", "uniform-8", "uniform-4", "xrpo"):
        random.seed(opts.seed)
        stream = stream_of(opts.seed, opts.beta)
        if name == "xrpo":
            r = run_xrpo(
                opts.rollouts,
                opts.batch,
                opts.budget_per_prompt,
                stream,
                {
                    "initial_rollouts": opts.initial,
                    "phases": opts.phases,
                    "exploration": opts.exploration,
                    "max_rollouts_per_prompt": 32,
                    **(
                        {}
                        if opts.prior_variance is None
                        else {"prior_variance": opts.prior_variance}
                    ),
                    **(
                        {}
                        if opts.prior_strength is None
                        else {"prior_strength": opts.prior_strength}
                    ),
                },
            )
        else:
            r = run_uniform(int(name.split("-")[1]), opts.rollouts, opts.batch, stream)
        r["informative_per_rollout"] = r["informative"] / r["rollouts"]
        r["informative_fraction"] = r["informative"] / r["groups"]
        results[name] = r
        emit({"arm": name, **r})

    base = results["uniform-16"]["informative_per_rollout"]
    ratio = results["xrpo"]["informative_per_rollout"] / base
    emit(
        {
            "summary": True,
            "difficulty_prior": f"Beta({opts.beta}, {opts.beta})",
            "xrpo_informative_per_rollout": results["xrpo"]["informative_per_rollout"],
            "uniform16_informative_per_rollout": base,
            "ratio_vs_uniform16": ratio,
            "ratio_vs_uniform8": results["xrpo"]["informative_per_rollout"]
            / results["uniform-8"]["informative_per_rollout"],
            "target_ratio_vs_uniform16_min": 1.5,
            "met": ratio >= 1.5,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
