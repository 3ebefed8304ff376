"""The shared scaffolding of every strategy in this package: token accounting against a
budget, the zero-shot fallback for an empty pool, and the final fit-to-budget pass.

Budgets count the whole chat-templated prompt in the model's tokens. A budget smaller than
the query alone is a :class:`~apportion_icl.errors.BudgetError`. Demonstrations are kept in
their strategy's order of preference and dropped from the least preferred end until the
prompt fits; a context that still does not fit is a ``PromptTooLongError``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

from apportion.base import ComponentConfig, Prompt, PromptStrategy
from apportion.errors import PromptTooLongError
from pydantic import Field

from apportion_icl.demos import Demo, as_demos, chat
from apportion_icl.errors import BudgetError, EmptyPoolWarning

_APPROX = re.compile(r"\w+|[^\w\s]")


class StrategyConfig(ComponentConfig):
    model: str = Field(
        "smollm2",
        description="LLM loaded (on the CPU, float32) by a strategy that runs or inspects it "
        "when no host bound one; the runner binds the run's model",
    )


class Tokens:
    """Counts chat-templated prompts with a tokenizer (without one: words and punctuation,
    an approximation the accounting marks as such)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.exact = tokenizer is not None

    def text(self, text: str) -> int:
        if self.tokenizer is None:
            return len(_APPROX.findall(text))
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def messages(self, msgs: Sequence[dict[str, str]]) -> int:
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(
                list(msgs), add_generation_prompt=True, tokenize=False
            )
            return len(tok.encode(rendered, add_special_tokens=False))
        return sum(self.text(m["content"]) + 2 for m in msgs)

    def demo(self, d: Demo) -> int:
        """Tokens one demonstration adds (its two turns with their template markers)."""
        return (
            self.messages(d.turns()) - self.messages([])
            if self.tokenizer is not None
            else self.text(d.input) + self.text(d.output) + 4
        )


def query_tokens(query: str, budget: int | None, tokens: Tokens) -> int:
    """The tokens the query alone takes with the chat template; a query that is not a
    non-empty string is a ``ValueError``, a budget that is not positive or that the query alone
    exceeds a :class:`~apportion_icl.errors.BudgetError`."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the query must be a non-empty string")
    if budget is not None and budget <= 0:
        raise BudgetError(f"the budget must be a positive number of tokens, got {budget}")
    need = tokens.messages(chat(query))
    if budget is not None and need > budget:
        raise BudgetError(
            f"the budget of {budget} tokens is smaller than the query alone "
            f"({need} tokens with the chat template); raise the budget or shorten the query"
        )
    return need


class ICLStrategy(PromptStrategy):
    """Base of the package's strategies. Subclasses implement :meth:`plan`, returning the
    (possibly rewritten) context, the demonstrations in order of preference, and accounting.

    Strategies that run the LLM read it from :attr:`llm`: the model given to :meth:`bind`
    (the core runner binds the run's model), else the ``model`` option, loaded on first use
    and kept on this instance.
    """

    name = "icl"
    Config = StrategyConfig

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self._llm: Any = None

    # ----------------------------------------------------------------- the LLM
    def bind(self, loaded: Any) -> ICLStrategy:  # type: ignore[override]
        """Run this loaded model (an :class:`apportion.host.LoadedModel`) instead of loading
        one. Returns the strategy, so that ``KNN().bind(loaded).build(...)`` reads well."""
        self._llm = loaded
        return self

    @property
    def llm(self) -> Any:
        """The bound model; unbound, the ``model`` option, loaded once for this instance."""
        if self._llm is None:
            from apportion_icl import runtime

            self._llm = runtime.load_llm(runtime.default_spec(self.config.model))
        return self._llm

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
        tokens = Tokens(tokenizer)
        query_tokens(query, budget, tokens)
        pool = as_demos(demos)
        if not pool and self.uses_demos:
            warnings.warn(
                f"{self.name}: the demonstration pool is empty; answering zero-shot",
                EmptyPoolWarning,
                stacklevel=2,
            )
        context, chosen, accounting = self.plan(query, context, pool, budget, tokens)
        return self.finish(query, context, chosen, pool, budget, tokens, accounting)

    uses_demos = True

    def plan(
        self, query: str, context: str | None, pool: list[Demo], budget: int | None, tokens: Tokens
    ) -> tuple[str | None, list[Demo], dict[str, Any]]:
        return context, [], {}

    def finish(
        self,
        query: str,
        context: str | None,
        chosen: list[Demo],
        pool: list[Demo],
        budget: int | None,
        tokens: Tokens,
        accounting: dict[str, Any],
        system: str | None = None,
    ) -> Prompt:
        """Drop the least preferred demonstrations until the prompt fits, then account."""
        kept = list(chosen)
        dropped: list[str] = []
        n = tokens.messages(chat(query, context, kept, system))
        while budget is not None and n > budget and kept:
            dropped.append(kept.pop().id)
            n = tokens.messages(chat(query, context, kept, system))
        if budget is not None and n > budget:
            raise PromptTooLongError(
                f"{self.name}: the context and query need {n} tokens but the budget is {budget}; "
                "use the 'prune' strategy or raise the budget"
            )
        accounting = {
            "strategy": self.name,
            "prompt_tokens": n,
            "tokens_exact": tokens.exact,
            "budget": budget,
            "demos_offered": len(pool),
            "demos_kept": len(kept),
            "demo_ids": [d.id for d in kept],
            "dropped_for_budget": dropped,
            "context_tokens": tokens.text(context) if context else 0,
            **accounting,
        }
        return Prompt(chat(query, context, kept, system), question=query, accounting=accounting)
