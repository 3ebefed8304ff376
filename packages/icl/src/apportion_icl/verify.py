"""``verify-loop``: iterative prompting with an external verifier. The model answers; the
verifier checks; a rejected answer goes back to the model with the verifier's reason, for
up to ``rounds`` attempts. The returned prompt is the conversation that led to the last
(accepted, or final) attempt, so the host's greedy answer to it is that attempt's successor
in the loop. Only a sound verifier helps (Stechly et al. 2024); a weak one adds cost."""

from __future__ import annotations

from pydantic import Field

from apportion_icl.demos import chat
from apportion_icl.strategy import ICLStrategy, StrategyConfig


class VerifyLoopConfig(StrategyConfig):
    verifier: str = Field(
        "grounded", description="'options', 'grounded', 'nonempty' or 'module:attr'"
    )
    rounds: int = Field(3, ge=1, le=10, description="attempts, including the first")
    answer_tokens: int = Field(32, ge=1, le=512)


class VerifyLoop(ICLStrategy):
    name = "verify-loop"
    summary = "iterative prompting: answers checked by an external verifier, rejections fed back"
    Config = VerifyLoopConfig
    uses_demos = False

    def plan(self, query, context, pool, budget, tokens):
        from apportion_icl.runtime import generate
        from apportion_icl.verifiers import resolve

        check = resolve(self.config.verifier)
        history: list[dict[str, str]] = []
        attempts = []
        for r in range(self.config.rounds):
            msgs = chat(query, context, pool) + history
            if budget is not None and tokens.messages(msgs) > budget:
                attempts.append({"round": r + 1, "stopped": "budget"})
                break
            answer = generate(self.llm, [msgs], self.config.answer_tokens)[0]
            ok, why = check(query, answer, context)
            attempts.append({"round": r + 1, "answer": answer, "accepted": ok, "reason": why})
            if ok or r == self.config.rounds - 1:
                break
            history += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"That answer was rejected: {why}. {query}"},
            ]
        self._history = history
        return (
            context,
            list(pool),
            {
                "attempts": attempts,
                "verifier": self.config.verifier,
                "accepted": any(a.get("accepted") for a in attempts),
            },
        )

    def finish(self, query, context, chosen, pool, budget, tokens, accounting, system=None):
        prompt = super().finish(query, context, chosen, pool, budget, tokens, accounting, system)
        if self._history:
            prompt.messages = prompt.messages + self._history
            prompt.accounting["prompt_tokens"] = tokens.messages(prompt.messages)
        return prompt
