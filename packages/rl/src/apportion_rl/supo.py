"""Trainer strategy ``supo`` (SUPO, "Scaling LLM multi-turn RL with end-to-end
summarization-based context management", Lu et al. 2025).

A rollout may need more tokens than the policy's working context holds. With SUPO the policy
manages its own context: when the working context nears ``working_limit`` tokens, the policy
is asked to summarise its progress, and the rollout goes on from the original prompt plus that
summary. Training treats the summaries as actions like any other token:

- :func:`rollout` runs one trajectory with a transformers model and returns its
  :class:`Segment` list, split at each summary; each segment is a (context the policy saw,
  tokens it wrote) pair, the inserted summary instruction masked out of the loss;
- the trajectory's reward gives one group-relative advantage (GRPO over the group's
  trajectories), shared by every token of every segment (:meth:`SUPO.segment_batch`);
- an *overlong* trajectory (still unfinished after ``max_summaries`` summaries) is masked: its
  reward is excluded from the group statistics and counted, and its tokens carry no loss, so
  the policy is neither rewarded nor punished for what the cut-off decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from apportion_rl.grpo import GRPO, GRPOConfig

SUMMARY_INSTRUCTION = (
    "Your working memory is almost full. Summarize your progress so far in a few sentences: "
    "the facts you found and what remains to do. Write only the summary."
)
RESUME_TEMPLATE = "Summary of your progress so far:\n{summary}\n\nContinue from there."


class SUPOConfig(GRPOConfig):
    working_limit: int = Field(2048, ge=32, description="tokens the working context may hold")
    summary_tokens: int = Field(128, ge=8, description="new tokens allowed for one summary")
    max_summaries: int = Field(3, ge=0, description="summaries before a rollout counts as overlong")
    max_new_tokens: int = Field(
        1024, ge=1, description="policy tokens per trajectory, all segments"
    )
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0 = greedy")


@dataclass
class Segment:
    """One training sequence: ``context_ids`` (not trained) then ``completion_ids``;
    ``completion_mask`` is 1 on tokens the policy wrote, 0 on inserted instruction tokens."""

    context_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]
    ends_with_summary: bool = False


@dataclass
class Trajectory:
    segments: list[Segment] = field(default_factory=list)
    answer: str = ""  # decoded text of the final segment's policy tokens
    finished: bool = False  # the policy ended it (EOS) within the limits
    summaries: list[str] = field(default_factory=list)
    reward: float | None = None

    @property
    def overlong(self) -> bool:
        return not self.finished


class SUPO(GRPO):
    name = "supo"
    summary = "SUPO: summarise near the context limit, split trajectories, mask overlong"
    Config = SUPOConfig
    # token-level aggregation over one batch: TRL's "bnpo"
    trl_loss_type = "bnpo"

    def segment_batch(
        self, groups: Sequence[Sequence[Trajectory]]
    ) -> tuple[list[Segment], list[float], list[int]]:
        """Flatten groups of scored trajectories into training segments.

        Returns ``(segments, advantages, keep)``: one advantage per segment (its trajectory's),
        and ``keep`` 0 for segments of overlong trajectories (mask their loss). Overlong
        rewards are excluded from the advantage statistics and counted in ``stats``.
        """
        rewards = [[t.reward if t.finished else None for t in g] for g in groups]
        adv = self.advantages(rewards)
        segments, seg_adv, keep = [], [], []
        for g, a in zip(groups, adv, strict=True):
            for t, at in zip(g, a, strict=True):
                for s in t.segments:
                    segments.append(s)
                    seg_adv.append(at)
                    keep.append(int(t.finished))
        return segments, seg_adv, keep

    def aggregate(self, per_token: Any, mask: Any) -> Any:
        # token-level: a long trajectory split into many segments weighs by its tokens
        return (per_token * mask).sum() / mask.sum().clamp(min=1)

    def rollout(self, model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> Trajectory:
        return rollout(model, tokenizer, messages, self.config)


def _generate(
    model: Any, ids: list[int], max_new: int, cfg: SUPOConfig, eos: set[int]
) -> list[int]:
    import torch

    x = torch.tensor([ids], device=model.device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": next(iter(eos))}
    if cfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    return out[0, len(ids) :].tolist()


def _chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _inserted_ids(tokenizer: Any, messages: list[dict[str, str]], partial: str) -> list[int]:
    """Tokens the chat template puts between the policy's partial turn and the summary: the
    end of that turn, the summary instruction, the next assistant header. The policy's own
    tokens are kept as generated (re-tokenising them could change them)."""
    ask = [
        *messages,
        {"role": "assistant", "content": partial},
        {"role": "user", "content": SUMMARY_INSTRUCTION},
    ]
    text = tokenizer.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)
    key = partial.strip()
    if key:
        at = text.rfind(key) + len(key)
    else:  # nothing written: everything after the assistant header was inserted
        at = len(
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    tail = text[at:]
    return tokenizer.encode(tail, add_special_tokens=False)


def rollout(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], config: SUPOConfig | None = None
) -> Trajectory:
    """Run one SUPO trajectory: generate until EOS, summarising whenever the working context
    is about to exceed ``working_limit`` (see the module doc). Raises ``ValueError`` when the
    prompt alone does not leave room for a summary."""
    cfg = config or SUPOConfig()
    configured = getattr(model.generation_config, "eos_token_id", None)
    eos = set(configured if isinstance(configured, list) else [configured])
    eos |= {tokenizer.eos_token_id}
    eos.discard(None)
    prompt_ids = _chat(tokenizer, messages)
    instr_ids = _chat(tokenizer, [*messages, {"role": "user", "content": SUMMARY_INSTRUCTION}])
    # tokens the summary instruction adds after a turn: what must stay free to summarise
    reserve = len(instr_ids) - len(prompt_ids) + cfg.summary_tokens + 8
    if len(prompt_ids) + reserve + 1 > cfg.working_limit:
        raise ValueError(
            f"the prompt takes {len(prompt_ids)} tokens and a summary needs {reserve} more, "
            f"which leaves no room under working_limit={cfg.working_limit}"
        )

    traj = Trajectory()
    context = prompt_ids
    budget = cfg.max_new_tokens
    while True:
        room = min(cfg.working_limit - len(context) - reserve, budget)
        if room <= 0:  # the resumed context alone fills the window: nothing more can be done
            break
        gen = _generate(model, context, room, cfg, eos)
        budget -= len(gen)
        if gen and gen[-1] in eos:
            traj.segments.append(Segment(context, gen, [1] * len(gen)))
            traj.answer = tokenizer.decode(gen, skip_special_tokens=True)
            traj.finished = True
            break
        if len(traj.summaries) >= cfg.max_summaries or budget <= 0:
            traj.segments.append(Segment(context, gen, [1] * len(gen)))
            traj.answer = tokenizer.decode(gen, skip_special_tokens=True)
            break
        # close the assistant turn, ask for a summary: these inserted tokens are not trained
        partial = tokenizer.decode(gen, skip_special_tokens=True)
        inserted = _inserted_ids(tokenizer, messages, partial)
        summary_ids = _generate(model, context + gen + inserted, cfg.summary_tokens, cfg, eos)
        traj.segments.append(
            Segment(
                context,
                gen + inserted + summary_ids,
                [1] * len(gen) + [0] * len(inserted) + [1] * len(summary_ids),
                ends_with_summary=True,
            )
        )
        summary = tokenizer.decode(summary_ids, skip_special_tokens=True).strip()
        traj.summaries.append(summary)
        context = _chat(
            tokenizer,
            [*messages, {"role": "user", "content": RESUME_TEMPLATE.format(summary=summary)}],
        )
    return traj
