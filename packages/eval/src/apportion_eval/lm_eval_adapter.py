"""The ``apportion`` model for lm-evaluation-harness: any lm-eval task through the apportion
host, under any installed attention backend, KV policy and allocator.

Register it once, then use it like any lm-eval model::

    from apportion_eval.lm_eval_adapter import register
    register()
    lm_eval.simple_evaluate(model="apportion", model_args="kv_policy=qspan,compression_ratio=0.5",
                            tasks=[...])

or from the shell, where ``python -m apportion_eval.lm_eval_adapter`` is ``lm_eval`` with
``apportion`` registered (lm-eval has no entry points for external models)::

    python -m apportion_eval.lm_eval_adapter --model apportion \\
        --model_args kv_policy=qspan,compression_ratio=0.5,attention=squeezed,budget=0.1 \\
        --tasks my_task --include_path tasks/

``model_args``:

- ``model`` (or lm-eval's ``pretrained``): ``smollm2`` (the embedded model, the default), an
  HF id in the local cache or a local folder; ``device``, ``dtype``, ``max_context`` as in a
  run config's ``[model]`` (lm-eval's ``--device`` fills ``device``).
- ``kv_policy``, ``attention``, ``allocator``: a component by its registered name
  (``full``, ``dense`` and ``pageable`` by default).
- Any other ``key=value`` is an option of one of those components: a bare key goes to the
  component whose config has that field (``compression_ratio`` -> the KV policy, ``budget``
  -> the attention backend); ``kv_policy.compression_ratio=0.5`` names the component outright
  (needed when two of them have the field).
- ``question_marker`` (default a blank line, ``"\\n\\n"``): the text after its last occurrence
  in a request's context is the *question*, the protected tail a KV policy keeps whole;
  ``""`` makes the question empty (the whole context may be evicted).
- ``question_in_prefill`` (default true): false compresses the context before the question is
  fed (query-agnostic, kvpress's ``query_aware=False``).
- ``batch_size``: prompts generated together (left-padded).

Names and options are checked against the registry before the model loads: an unknown
component or option fails with the registry's own one-line error and its did-you-mean.

What each request means under a KV policy:

- ``generate_until``: the context is prefilled through the attention backend and the KV
  policy (question kept), then decoded greedily by :meth:`apportion.host.Host.generate_ids`
  for at most ``max_gen_toks`` tokens or until the model's eos; the answer is cut at the first
  ``until`` string. Decoding does not stop early at a stop string (the cut is applied to the
  decoded text, so the answer is the same, at the cost of the tokens past it). Only greedy
  decoding: ``do_sample=True`` or a temperature above 0 is refused.
- ``loglikelihood``: the context is prefilled and compressed by the policy (question kept),
  then the continuation is fed whole after it (positions continuing from the uncompressed
  length) and its log-probabilities are read: the score of the continuation given what the
  policy kept of the context. With the ``full`` policy and ``dense`` attention it is the
  model's own log-likelihood, as lm-eval's ``hf`` model computes it.
- ``loglikelihood_rolling``: lm-eval's rolling windows, each scored as ``loglikelihood``
  (the policy compresses each window's conditioning prefix; the scored tokens are kept).

Tokenization is lm-eval's ``hf`` model's (the same context/continuation split, BOS handling
and left truncation to the model's window), so the two agree request for request.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from apportion.errors import ConfigError
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

MODEL_NAME = "apportion"
#: model_args field -> component kind
COMPONENT_KINDS = {"kv_policy": "kv-policy", "attention": "attention", "allocator": "allocator"}
DEFAULT_COMPONENTS = {"kv_policy": "full", "attention": "dense", "allocator": "pageable"}
MODEL_KEYS = ("model", "pretrained", "device", "dtype", "max_context")
ADAPTER_KEYS = ("question_marker", "question_in_prefill", "batch_size", "max_batch_size")
DEFAULT_MAX_GEN_TOKS = 256


def register() -> None:
    """Register ``apportion`` in lm-eval's model registry (again is a no-op).

    lm-eval's built-in models are registered first: lm-eval registers them only while its
    registry is empty, so registering ours alone would hide ``hf`` and the rest."""
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models)

    register_model(MODEL_NAME)(ApportionLM)


def resolve_args(args: dict[str, Any], registry: Any = None) -> dict[str, Any]:
    """Split ``model_args`` into the model spec, each component's (name, validated config) and
    the adapter's own options; raise the registry's errors for unknown names and options."""
    from apportion.config import ModelSpec
    from apportion.plugins import get_registry
    from apportion.registry import unknown_field_message

    registry = registry or get_registry()
    args = dict(args)
    names = {f: str(args.pop(f, DEFAULT_COMPONENTS[f])) for f in COMPONENT_KINDS}
    specs = {f: registry.get(kind, names[f]) for f, kind in COMPONENT_KINDS.items()}
    model = {k: args.pop(k) for k in MODEL_KEYS if k in args}
    if "pretrained" in model:
        model.setdefault("model", model.pop("pretrained"))
        model.pop("pretrained", None)
    own = {k: args.pop(k) for k in ADAPTER_KEYS if k in args}
    fields = {f: set(s.config_model().model_fields) for f, s in specs.items()}
    options: dict[str, dict[str, Any]] = {f: {} for f in COMPONENT_KINDS}
    for key, value in args.items():
        field, dot, option = key.partition(".")
        if dot and field in COMPONENT_KINDS:
            options[field][option] = value
            continue
        owners = [f for f in COMPONENT_KINDS if key in fields[f]]
        if len(owners) > 1:
            raise ConfigError(
                f"model_args {key!r} is an option of {' and '.join(names[f] for f in owners)}; "
                f"name one: {', '.join(f'{f}.{key}' for f in owners)}",
                [(key, "ambiguous")],
            )
        if not owners:
            valid = sorted(
                set(MODEL_KEYS)
                | set(ADAPTER_KEYS)
                | set(COMPONENT_KINDS)
                | {k for f in COMPONENT_KINDS for k in fields[f]}
            )
            raise ConfigError(
                "model_args: " + unknown_field_message(key, valid, noun="argument"),
                [(key, "unknown")],
            )
        options[owners[0]][key] = value
    configs = {}
    for f in COMPONENT_KINDS:
        try:
            configs[f] = specs[f].validate_options(options[f], where=f)
        except ConfigError as exc:  # the registry's message, one line
            lines = "; ".join(f"{loc}: {msg}" for loc, msg in exc.errors)
            kind = COMPONENT_KINDS[f]
            raise ConfigError(
                f"model_args: invalid options for {kind} {names[f]!r}: {lines}", exc.errors
            ) from None
    chosen = {COMPONENT_KINDS[f]: names[f] for f in COMPONENT_KINDS}
    for f, spec in specs.items():
        for kind, clash in spec.incompatible_with.items():
            if chosen.get(kind) in clash:
                raise ConfigError(
                    f"{COMPONENT_KINDS[f]} {names[f]!r} cannot be combined with {kind} "
                    f"{chosen[kind]!r}",
                    [(f, "incompatible")],
                )
    name = str(model.pop("model", "smollm2"))
    if model.get("device") is None:
        model.pop("device", None)
    try:
        spec = ModelSpec(name=name, **model)
    except Exception as exc:  # pydantic's ValidationError, one line per field
        raise ConfigError(f"model_args: {exc}".splitlines()[0], [("model", str(exc))]) from None
    return {"model": spec, "names": names, "specs": specs, "configs": configs, "own": own}


class ApportionLM(TemplateLM):
    """lm-eval's ``LM`` over an :class:`apportion.host.Host` (see the module docstring)."""

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        from apportion.host import Host, load_model

        resolved = resolve_args(model_args)
        own = resolved["own"]
        marker = own.get("question_marker", "\n\n")
        self.question_marker = "" if marker is None else str(marker)
        bs = own.get("batch_size", 1)
        self.batch_size = 1 if bs in (None, "auto") or str(bs).startswith("auto") else int(bs)
        if self.batch_size < 1:
            raise ConfigError("model_args batch_size must be at least 1", [("batch_size", bs)])
        self.component_names = resolved["names"]
        self.loaded = load_model(resolved["model"])
        comps = {f: resolved["specs"][f].create(resolved["configs"][f]) for f in resolved["specs"]}
        self.host = Host(
            self.loaded,
            comps["attention"],
            comps["kv_policy"],
            comps["allocator"],
            question_in_prefill=bool(own.get("question_in_prefill", True)),
        )
        self.tokenizer = self.loaded.tokenizer
        self._device = self.loaded.device
        #: per-request figures of the last call (tokens, peak KV bytes), for reports
        self.stats: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ lm-eval's LM surface
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return int(self.loaded.max_context)

    @property
    def max_gen_toks(self) -> int:
        return DEFAULT_MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        )

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """As lm-eval's ``hf`` model: the tokenizer's own special tokens, except for a string
        that already starts with the BOS token."""
        kw: dict[str, Any] = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        else:
            bos = self.tokenizer.decode(self.prefix_token_id)
            if bos and string.startswith(bos):
                kw["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **kw))

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens))

    # ------------------------------------------------------------------ the question
    def question_len(self, text: str, ids: Sequence[int]) -> int:
        """Tokens of ``ids`` (the encoding of ``text``) after the last ``question_marker``:
        those whose text starts at or after it (the common prefix of the encodings of
        ``text`` and of the text before the marker is the context)."""
        if not self.question_marker:
            return 0
        split = text.rfind(self.question_marker)
        if split < 0:
            return 0
        head = self.tok_encode(text[: split + len(self.question_marker)])
        common = 0
        for a, b in zip(head, ids, strict=False):
            if a != b:
                break
            common += 1
        return max(0, len(ids) - common)

    # ------------------------------------------------------------------ generate_until
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

        out: list[str | None] = [None] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[tuple[str, int], list[tuple[int, list[int], int]]] = {}
        stops: dict[tuple[str, int], list[str]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise ConfigError(
                    "the apportion host decodes greedily: do_sample=True or a temperature "
                    "above 0 cannot be honoured",
                    [("gen_kwargs", str(gen_kwargs))],
                )
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            n = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or self.max_gen_toks)
            if n >= self.max_length:
                raise ConfigError(
                    f"max_gen_toks={n} does not leave room for a prompt in the model's "
                    f"{self.max_length} tokens",
                    [("max_gen_toks", str(n))],
                )
            ids = self.tok_encode(context)[-(self.max_length - n) :]
            key = ("\x00".join(until), n)
            stops[key] = until
            groups.setdefault(key, []).append((i, ids, self.question_len(context, ids)))
        self.stats = []
        for key, items in groups.items():
            until, n = stops[key], key[1]
            items.sort(key=lambda x: -len(x[1]))  # similar lengths share a padded batch
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                results = self.host.generate_ids(
                    [ids for _, ids, _ in chunk], [q for _, _, q in chunk], max_new_tokens=n
                )
                for (i, _, _), res in zip(chunk, results, strict=True):
                    raw = self.tok_decode(res.token_ids or [])
                    text = postprocess_generated_text(raw, until, None)
                    out[i] = text
                    self.stats.append({"request": i, **res.as_dict()})
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [o if o is not None else "" for o in out]

    # ------------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Each (context ids, continuation ids) scored one at a time: the context through the
        KV policy's prefill (left-truncated as lm-eval's ``hf`` model does), then the
        continuation fed after it; returns (sum of its log-probs, whether greedy)."""
        out = []
        for request, ctx, cont in requests:
            if not cont:
                raise ConfigError("a loglikelihood request has an empty continuation")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            feed = len(cont) - 1
            prefix = whole[: len(whole) - 1 - feed]
            text = request[0] if request is not None else ""
            q = self.question_len(text, prefix) if request is not None and prefix == ctx else 0
            logprobs = self._continuation_logprobs(prefix, list(cont), q)
            target = torch.tensor(cont, device=logprobs.device)
            score = float(logprobs.gather(-1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == target).all())
            out.append((score, greedy))
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, (score, greedy))
        return out

    @torch.inference_mode()
    def _continuation_logprobs(
        self, prefix: list[int], cont: list[int], question_len: int
    ) -> torch.Tensor:
        """(len(cont), vocab) log-probs of each continuation position given ``prefix``
        prefilled under the host's attention backend and KV policy."""
        from apportion.host.kv import cache_kwargs, cache_seq_lengths

        host, model = self.host, self.loaded.model
        device = self.loaded.device
        q = max(0, min(question_len, len(prefix) - 1))
        if not host.question_in_prefill and q > 0:
            cache, pre = host.prefill_context([prefix[: len(prefix) - q]])
            feed_ids = prefix[len(prefix) - q :] + cont[:-1]
            first = None
        else:
            ids = torch.tensor([prefix], device=device)
            cache = host.kv_policy.make_cache(model)
            with host.attention.installed(model), host.kv_policy.installed(model):
                pre = host.attention.prefill(
                    model,
                    ids,
                    torch.ones_like(ids),
                    cache,
                    question_len=q,
                    inner=host.kv_policy.prefill,
                )
            feed_ids, first = cont[:-1], pre.logits.float()
        rows = [] if first is None else [first]
        if feed_ids:
            past = max(cache_seq_lengths(cache) or [0])
            kv_mask = pre.kv_mask if pre.kv_mask is not None else torch.ones((1, past))
            n = len(feed_ids)
            mask = torch.cat([kv_mask.bool().to(device), torch.ones((1, n), dtype=torch.bool)], 1)
            with host.attention.installed(model), host.kv_policy.installed(model):
                logits = (
                    model(
                        input_ids=torch.tensor([feed_ids], device=device),
                        attention_mask=mask.long().to(device),
                        position_ids=pre.next_position[:, None]
                        + torch.arange(n, device=device)[None],
                        use_cache=True,
                        **cache_kwargs(model, cache),
                    )
                    .logits[0]
                    .float()
                )
            keep = len(cont) - len(rows)
            rows.append(logits[-keep:])
        return torch.log_softmax(torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]), dim=-1)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for req in requests:
            (string,) = req.args
            windows = map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(s for s, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out


def main(argv: Sequence[str] | None = None) -> None:
    """``lm_eval``'s command line with ``apportion`` registered; an apportion error (an
    unknown component or option) is one line on stderr and exit status 2."""
    from apportion.errors import ApportionError
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    register()
    try:
        cli_evaluate()
    except ApportionError as exc:
        print(f"apportion: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
