"""``arc-compress``: the context as ``k`` times fewer input embeddings, read by the frozen
decoder (ARC-Encoder, Pilchen et al. 2025; ICAE, Ge et al. 2024; 500xCompressor, Li et al.).

The strategy compresses the context with :class:`~apportion_icl.compressor.model.Compressor`
(the first ``encoder_layers`` layers of the served model, mean-pooled over every ``k``
tokens, through the trained projector) and hands the host the vectors through
``Prompt.embeds``: the user turn is ``PLACEHOLDER + "\\n\\n" + query``, the host reads the
``ceil(n / k)`` vectors where the placeholder stands, and the question stays text. The
prompt's context part therefore costs ``ceil(n / k)`` tokens instead of ``n``, in the
prompt, the KV cache and the prefill.

Options: ``k`` (4 or 8, a pooling factor the artifact was trained for); ``artifact`` (the
trained projector, see :mod:`~apportion_icl.compressor.artifact`; default the user cache's
``icl/arc-compressor.safetensors`` written by ``apportion icl compressor-train``, else the
one shipped in the package); ``encoder_layers`` (checked against the artifact; the shipped
one uses 0, the token embeddings: in 80-step trials at k = 4, layers 1, 2 and 8 left a
higher reconstruction loss, 4.29, 4.32 and 4.18 against 3.79); ``random_init`` (a fresh,
untrained projector: for tests and smoke runs; it hands the decoder the normalised group
means).

Limits, measured (``benchmarks/icl_compressor.py``, SmolLM2-135M-Instruct, the shipped
projector: ``encoder_layers = 0``, 650 steps, 18 minutes on one shared CPU core; the papers
train far longer, for decoders of billions of parameters): the context's tokens do fall 4x
and 8x (3.98x and 7.94x, the last group rounding up), but the 135M decoder reads almost
nothing specific from them. On 12 niah-like prompts (256 to 512 tokens) and 24 questions of
the shipped QA set it answered **none** correctly at k = 4 or k = 8 (uncompressed: 67% and
38%; ``prune`` within the same prompt-token count: 92-100% and 46-50%). Training taught the
decoder to answer in the right form ("The access code for the purple chest is 123456.",
"Marrow Labs was founded in 1980.") with invented values, where the untrained projector gets
empty or broken answers; asked to repeat the compressed passage, it writes generic prose of
the right kind (scenery for the filler, a short biography for the QA documents) with hardly
a word specific to the passage (0-0.4 per answer, as many as from a sibling passage; the
uncompressed context: 3.5-5.9). Exact strings (7-digit codes, fictional names and places)
are not recovered; what survives is the genre. Use it to study the mechanism
(``Prompt.embeds``, token accounting, the training loop) or as a starting point for longer
training, not where an answer needs the context's content.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from apportion.base import Prompt
from apportion.errors import PromptTooLongError
from pydantic import Field

from apportion_icl.compressor.artifact import ARTIFACT_NAME
from apportion_icl.demos import chat
from apportion_icl.errors import ArtifactError
from apportion_icl.strategy import ICLStrategy, StrategyConfig, Tokens, query_tokens

#: where the compressed context stands in the user turn (never tokenized: the host reads the
#: vectors there)
PLACEHOLDER = "<|apportion:compressed-context|>"
DEFAULT_ENCODER_LAYERS = 0
DEFAULT_HIDDEN = 512


class ArcCompressConfig(StrategyConfig):
    k: Literal[4, 8] = Field(
        4, description="context tokens per compressed embedding (the pooling factor)"
    )
    artifact: str | None = Field(
        None,
        description="the trained projector (.safetensors); None: the user cache's "
        "icl/arc-compressor.safetensors (`apportion icl compressor-train` writes it), else "
        "the one shipped in the package",
    )
    encoder_layers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="decoder layers the encoder runs (0: token embeddings); None: the "
        f"artifact's ({DEFAULT_ENCODER_LAYERS} with random_init); must match the artifact",
    )
    random_init: bool = Field(
        False,
        description="use a fresh, untrained projector (seeded) instead of an artifact: for "
        "tests and smoke runs; it hands the decoder normalised mean-pooled states",
    )
    seed: int = Field(0, description="seed of the random_init projector")


def compressed_prompt(query: str, vectors: Any) -> Prompt:
    """The prompt the decoder reads: the compressed context (``vectors``, (n, hidden)) where
    :data:`PLACEHOLDER` stands, a blank line, then ``query`` as text."""
    return Prompt(chat(query, PLACEHOLDER), question=query, embeds={PLACEHOLDER: vectors})


def count_tokens(tokenizer: Any, messages: Sequence[dict[str, str]], query: str, n: int) -> int:
    """Tokens of ``messages`` as the host counts a prompt with ``Prompt.embeds``: the text
    around the placeholder tokenized piece by piece, and ``n`` slots for the placeholder."""
    tokens = Tokens(tokenizer)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return tokens.messages(messages) - tokens.text(PLACEHOLDER) + n
    text = str(
        tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    )
    at = text.index(PLACEHOLDER)
    rest = text[at + len(PLACEHOLDER) :]
    split = rest.rfind(query)
    pieces = [text[:at], rest[:split], rest[split:]] if split >= 0 else [text[:at], rest]
    return n + sum(tokens.text(p) for p in pieces if p)


def shipped_artifact() -> Path:
    """The projector shipped in the package (``data/arc-compressor.safetensors``, trained
    for the embedded SmolLM2 with ``apportion icl compressor-train``'s defaults)."""
    from importlib import resources

    return Path(str(resources.files("apportion_icl").joinpath("data", ARTIFACT_NAME)))


def find_artifact(path: str | None) -> Path:
    """The artifact to load: ``path``; else the user cache's
    (:func:`~apportion_icl.compressor.artifact.default_path`, where
    ``apportion icl compressor-train`` writes) when there is one; else the shipped one."""
    from apportion_icl.compressor.artifact import default_path

    if path:
        return Path(path).expanduser()
    own = default_path()
    shipped = shipped_artifact()
    return own if own.is_file() or not shipped.is_file() else shipped


class ArcCompress(ICLStrategy):
    name = "arc-compress"
    summary = (
        "ARC-Encoder-style learned compression: the context as k-times fewer input embeddings "
        "(trained projector over the model's first layers; the question stays text)"
    )
    Config = ArcCompressConfig
    uses_demos = False

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._compressor: Any = None
        self._source: dict[str, Any] = {}

    def bind(self, loaded: Any) -> ArcCompress:
        if loaded is not self._llm:
            self._compressor = None
        super().bind(loaded)
        return self

    # ----------------------------------------------------------------- the compressor
    def compressor(self) -> Any:
        """The :class:`~apportion_icl.compressor.model.Compressor` for the bound model: the
        artifact's projector (checked against the model and the options), or a fresh one
        with ``random_init``. Loaded once per bound model."""
        if self._compressor is not None:
            return self._compressor
        from apportion_icl.compressor.model import Compressor, Projector

        cfg, loaded = self.config, self.llm
        if cfg.random_init:
            from apportion_icl.compressor.train import new_projector

            layers = DEFAULT_ENCODER_LAYERS if cfg.encoder_layers is None else cfg.encoder_layers
            projector = new_projector(loaded, DEFAULT_HIDDEN, cfg.seed)
            self._source = {"artifact": "random-init", "trained": False}
        else:
            from apportion_icl.compressor.artifact import Artifact

            path = find_artifact(cfg.artifact)
            art = Artifact.load(path)
            meta = art.meta
            layers = meta["encoder_layers"]
            if cfg.encoder_layers is not None and cfg.encoder_layers != layers:
                raise ArtifactError(
                    f"{path}: trained with encoder_layers = {layers}, but the option asks for "
                    f"{cfg.encoder_layers}; drop the option or train an artifact for it"
                )
            if cfg.k not in meta["k_values"]:
                raise ArtifactError(
                    f"{path}: trained for k in {meta['k_values']}, not k = {cfg.k}; train one "
                    f"with `apportion icl compressor-train --k {cfg.k}`"
                )
            want = meta.get("model_fingerprint")
            if want and want != loaded.fingerprint:
                raise ArtifactError(
                    f"{path}: trained for the model {meta.get('model')!r} (fingerprint {want}), "
                    f"but this model is {loaded.name!r} ({loaded.fingerprint}); train one for it"
                )
            dim = int(loaded.model.get_input_embeddings().weight.shape[-1])
            if meta["dim"] != dim:
                raise ArtifactError(f"{path}: projects to {meta['dim']} dimensions, not {dim}")
            projector = Projector(meta["dim"], meta["hidden"])
            projector.load_state_dict(art.tensors)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            self._source = {"artifact": str(path), "artifact_sha256": digest, "trained": True}
        projector.eval().requires_grad_(False)
        self._compressor = Compressor(loaded, projector, layers)
        return self._compressor

    def compress(self, context: str) -> Any:
        """(ceil(n / k), hidden) input embeddings of ``context`` (n tokens of the model's
        tokenizer)."""
        import torch

        ids = self.llm.tokenizer.encode(context, add_special_tokens=False)
        with torch.no_grad():
            return self.compressor().compress(ids, self.config.k)

    # ----------------------------------------------------------------- build
    def build(
        self,
        query: str,
        *,
        context: str | None = None,
        demos: Sequence[Any] = (),
        budget: int | None = None,
        tokenizer: Any = None,
    ) -> Prompt:
        """The prompt with the context compressed (see the module docstring); without a
        context, the query alone. ``accounting``: ``context_tokens`` (the context's
        tokens), ``compressed_tokens`` (the slots it takes), ``prompt_tokens`` (the whole
        prompt, as the host counts it), ``k``, ``encoder_layers``, the artifact and the
        compression time. A budget smaller than the query alone is a
        :class:`~apportion_icl.errors.BudgetError`; a compressed prompt that still exceeds
        it, a ``PromptTooLongError``."""
        tokens = Tokens(tokenizer)
        query_tokens(query, budget, tokens)
        if not context or not context.strip():
            return self.finish(query, None, [], [], budget, tokens, {"compressed": False})
        t0 = time.perf_counter()
        vectors = self.compress(context)
        seconds = time.perf_counter() - t0
        prompt = compressed_prompt(query, vectors)
        tok = self.llm.tokenizer
        n = count_tokens(tok, prompt.messages, query, int(vectors.shape[0]))
        if budget is not None and n > budget:
            raise PromptTooLongError(
                f"{self.name}: the compressed context and query need {n} tokens but the budget "
                f"is {budget}; use k = 8, prune the context first, or raise the budget"
            )
        n_ctx = len(tok.encode(context, add_special_tokens=False))
        prompt.accounting = {
            "strategy": self.name,
            "prompt_tokens": n,
            "tokens_exact": True,
            "budget": budget,
            "demos_offered": len(demos),
            "demos_kept": 0,
            "compressed": True,
            "context_tokens": n_ctx,
            "compressed_tokens": int(vectors.shape[0]),
            "context_compression": round(n_ctx / int(vectors.shape[0]), 3),
            "k": self.config.k,
            "encoder_layers": self.compressor().encoder_layers,
            **self._source,
            "compress_seconds": round(seconds, 4),
        }
        return prompt
