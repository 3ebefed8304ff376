"""Training the compressor's projector against the frozen decoder, on the CPU.

Each step draws a passage from :mod:`apportion_icl.compressor.texts` and one of two tasks
(ICAE's pair of objectives, as ARC-Encoder pretrains):

- **reconstruction**: the decoder, given the compressed passage and the instruction
  :data:`RECONSTRUCT`, must reproduce the passage token by token;
- **question answering**: given the compressed passage and a question about it, the
  decoder must say the answer the way it says it from the plain text (it restates the
  question: "The access code for the red locker is 4417302.").

The prompt is laid out exactly as the ``arc-compress`` strategy lays it out (chat template,
the placeholder where the context stands, the question as text), through the host's own
encoder of ``Prompt.embeds``, so that training and use see the same sequence. The loss is
the decoder's mean cross-entropy on the target tokens (and the end-of-turn token); only the
projector learns, the decoder and the encoder (its first layers) stay frozen. ``k`` is drawn
per step from ``k_values``: one projector serves every trained ``k``.

The data is generated (profiles over names the shipped QA set does not use, needle
passages, filler prose), so ``data/qa.jsonl`` stays held out.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apportion_icl.compressor import texts
from apportion_icl.compressor.artifact import Artifact, default_path
from apportion_icl.compressor.model import Compressor, Projector, embedding_rms

RECONSTRUCT = "Repeat the text above word for word."
TASKS = ("reconstruct", "qa")


@dataclass
class Example:
    """A passage to compress, the question asked after it, and the target answer."""

    context: str
    question: str
    target: str
    task: str


def example(rng: random.Random, task: str | None = None) -> Example:
    """One training example: a generated passage and a task (drawn when ``task`` is None)."""
    p = texts.passage(rng)
    task = task or rng.choice(TASKS)
    if task == "qa" and p.qa:
        qa = rng.choice(p.qa)
        return Example(p.text, qa.question, qa.sentence, "qa")
    return Example(p.text, RECONSTRUCT, p.text, "reconstruct")


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[None]:
    """The model's parameters without gradients for the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Objective:
    """The decoder's loss on an example's target, given the compressed context."""

    def __init__(self, compressor: Compressor, max_context_tokens: int = 128):
        from apportion.host import Host

        self.compressor = compressor
        self.loaded = compressor.loaded
        self.host = Host(self.loaded)
        self.max_context_tokens = int(max_context_tokens)
        tok = self.loaded.tokenizer
        self.end = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []

    def context_ids(self, text: str) -> list[int]:
        ids = self.loaded.tokenizer.encode(text, add_special_tokens=False)
        return ids[: self.max_context_tokens]

    def loss(self, ex: Example, k: int) -> torch.Tensor:
        """Mean cross-entropy of ``ex.target`` (then the end-of-turn token)."""
        from apportion_icl.compressor.strategy import compressed_prompt

        tok, model = self.loaded.tokenizer, self.loaded.model
        ctx = self.context_ids(ex.context)
        vectors = self.compressor.compress(ctx, k)
        enc = self.host.encode(compressed_prompt(ex.question, vectors.detach()))
        ((start, _),) = enc.embeds
        if ex.task == "reconstruct":
            tgt = ctx + self.end
        else:
            tgt = tok.encode(ex.target, add_special_tokens=False)[: self.max_context_tokens]
            tgt += self.end
        device = self.loaded.device
        emb = model.get_input_embeddings()
        head = emb(torch.tensor(enc.ids[:start], device=device))
        rest = emb(torch.tensor(enc.ids[start + len(vectors) :] + tgt, device=device))
        x = torch.cat([head, vectors.to(head.dtype), rest])[None]
        hidden = getattr(model, "model", model)(inputs_embeds=x, use_cache=False)
        h = hidden.last_hidden_state[0, len(enc.ids) - 1 : -1]
        logits = model.lm_head(h).float()
        return torch.nn.functional.cross_entropy(logits, torch.tensor(tgt, device=device))

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], k_values: Sequence[int]) -> dict[str, float]:
        """Mean loss per task and k (``"reconstruct@4"``, ``"qa@8"``, ...) and overall."""
        sums: dict[str, list[float]] = {}
        for k in k_values:
            for ex in examples:
                sums.setdefault(f"{ex.task}@{k}", []).append(float(self.loss(ex, k)))
        out = {key: round(sum(v) / len(v), 4) for key, v in sorted(sums.items())}
        every = [x for v in sums.values() for x in v]
        out["all"] = round(sum(every) / len(every), 4)
        return out


@dataclass
class TrainResult:
    artifact: Artifact
    path: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


def new_projector(loaded: Any, hidden: int = 512, seed: int = 0) -> Projector:
    """A fresh projector for ``loaded``'s model (seeded; the global RNG is left alone)."""
    dim = int(loaded.model.get_input_embeddings().weight.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Projector(dim, hidden, embedding_rms(loaded.model))


def train(
    out: str | Path | None = None,
    *,
    k_values: Sequence[int] = (4, 8),
    encoder_layers: int = 0,
    hidden: int = 512,
    steps: int = 400,
    max_seconds: float | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    max_context_tokens: int = 128,
    eval_examples: int = 12,
    examples: Sequence[Example] | None = None,
    loaded: Any = None,
    model: str = "smollm2",
    save: bool = True,
    checkpoint_every: int = 50,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a projector and save it (see the module docstring); returns the artifact, its
    path (``None`` when ``save=False``) and the loss history.

    ``k_values``: the pooling factors trained (one drawn per step); ``encoder_layers``: how
    many of the decoder's first layers encode; ``hidden``: the projector's width;
    ``steps``/``max_seconds``: stop at whichever comes first; ``lr``: Adam's peak learning
    rate (10 warm-up steps, cosine decay to a tenth); ``max_context_tokens``: passages and
    reconstruction targets are cut there; ``examples``: train on these (cycled) instead of
    generated ones, and evaluate on them (a test's tiny run); ``eval_examples``: the size of
    the held-out generated set whose loss is measured before and after training (and
    recorded in the artifact). ``loaded``: the decoder (default: ``model`` on the CPU).
    ``checkpoint_every``: save the artifact every so many steps, so a killed run leaves
    one. ``on_step(step, loss)`` reports progress.
    """
    from apportion_icl.runtime import default_spec, load_llm

    ks = sorted({int(k) for k in k_values})
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"k_values must be positive integers, got {list(k_values)}")
    loaded = loaded or load_llm(default_spec(model))
    projector = new_projector(loaded, hidden, seed)
    compressor = Compressor(loaded, projector, encoder_layers)
    objective = Objective(compressor, max_context_tokens)
    rng = random.Random(seed)
    held_out = (
        list(examples)
        if examples is not None
        else [example(random.Random(f"eval:{i}")) for i in range(eval_examples)]
    )
    path = Path(out) if out is not None else default_path()
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with frozen(loaded.model):
        before = objective.evaluate(held_out, ks)
        history.append({"step": 0, "eval": before, "seconds": 0.0})
        opt = torch.optim.Adam(projector.parameters(), lr=lr)
        warmup = min(10, max(1, steps // 10))

        def rate(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            done = (step - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
        recent: list[float] = []
        step = 0
        for step in range(1, steps + 1):
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                step -= 1
                break
            ex = held_out[(step - 1) % len(held_out)] if examples is not None else example(rng)
            k = ks[(step - 1) % len(ks)] if examples is not None else rng.choice(ks)
            loss = objective.loss(ex, k)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
            opt.step()
            sched.step()
            recent.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, recent[-1])
            if step % 10 == 0:
                history.append(
                    {
                        "step": step,
                        "train_loss_last10": round(sum(recent[-10:]) / len(recent[-10:]), 4),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
            if save and checkpoint_every and step % checkpoint_every == 0:
                _artifact(projector, compressor, ks, loaded, history, step, t0, seed).save(path)
        after = objective.evaluate(held_out, ks)
        history.append({"step": step, "eval": after, "seconds": round(time.perf_counter() - t0, 1)})
    artifact = _artifact(projector, compressor, ks, loaded, history, step, t0, seed)
    saved = artifact.save(path) if save else None
    return TrainResult(artifact, saved, history)


def _artifact(
    projector: Projector,
    compressor: Compressor,
    ks: list[int],
    loaded: Any,
    history: list[dict[str, Any]],
    step: int,
    t0: float,
    seed: int,
) -> Artifact:
    evals = [h["eval"] for h in history if "eval" in h]
    meta = {
        "k_values": ks,
        "encoder_layers": compressor.encoder_layers,
        "dim": projector.dim,
        "hidden": projector.hidden,
        "model": getattr(loaded, "name", ""),
        "model_fingerprint": getattr(loaded, "fingerprint", ""),
        "steps": step,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "eval_before": evals[0] if evals else None,
        "eval_after": evals[-1] if len(evals) > 1 else None,
        "data": "generated: profiles, needle passages, filler prose (texts.py)",
        "objectives": list(TASKS),
    }
    tensors = {k: v.detach().clone() for k, v in projector.state_dict().items()}
    return Artifact(tensors, meta)
