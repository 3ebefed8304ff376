"""The KVCOMM workload: a small team of agents (SmolLM2) over a shared retrieved document.

Each task has one document (stdlib-docstring prose with a few planted facts) and one
question. Round 1: every agent reads the document under its own role prompt and writes a
short message. Round 2: every agent reads the document *and the other agents' messages*
and answers. The document is shared by every prompt of the task and each message by every
agent but its author: those are the shared segments KVCOMM reuses.

:func:`run_team` runs the same tasks under a policy and under full prefill, on the *same*
messages (round 2 is built from full prefill's round-1 messages, so the two conditions see
identical prompts), and reports reuse, prefill time and agreement.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from apportion.base import Prompt
from apportion.host.kv import KVPolicy, cache_kwargs

ROLES = {
    "Researcher": "You are the Researcher. You find the exact facts in documents and quote them.",
    "Analyst": "You are the Analyst. You check numbers carefully and explain what they mean.",
    "Critic": "You are the Critic. You look for mistakes in what others say and correct them.",
    "Writer": "You are the Writer. You turn the team's findings into one clear final answer.",
    "Planner": "You are the Planner. You decide which facts matter for the question.",
}

ROUND1 = {
    "Researcher": "Quote the sentence of the document that answers: {q}",
    "Analyst": "{q} Say the number and whether it is more than 5000.",
    "Critic": "{q} Name one other number in the document that could be confused with it.",
    "Writer": "{q} Write one sentence for the team's report.",
    "Planner": "{q} Say which sentence of the document matters.",
}

ITEMS = (
    "budget",
    "room number",
    "launch year",
    "batch size",
    "server port",
    "order count",
    "ticket number",
    "team size",
    "release build",
    "storage quota",
)


@dataclass
class Task:
    id: str
    document: str
    question: str
    answer: str


def make_tasks(n: int, *, seed: int = 0, sentences_per_doc: int = 14, facts: int = 3) -> list[Task]:
    """Deterministic tasks: prose documents with ``facts`` planted numbers, one asked about."""
    from apportion.baselines.haystack import sentences

    pool = list(sentences())
    rng = random.Random(seed)
    tasks = []
    for t in range(n):
        body = rng.sample(pool, sentences_per_doc)
        items = rng.sample(ITEMS, facts)
        values = [str(rng.randint(1000, 9999)) for _ in items]
        for item, value in zip(items, values, strict=True):
            body.insert(rng.randrange(len(body) + 1), f"The {item} of the project is {value}.")
        ask = rng.randrange(facts)
        tasks.append(
            Task(
                f"task{t}", " ".join(body), f"What is the {items[ask]} of the project?", values[ask]
            )
        )
    return tasks


def round1_prompt(role: str, task: Task) -> Prompt:
    q = ROUND1[role].format(q=task.question)
    return Prompt(
        [
            {"role": "system", "content": ROLES[role]},
            {"role": "user", "content": f"Document:\n{task.document}\n\n{q}"},
        ],
        question=q,
    )


def round2_prompt(role: str, task: Task, messages: dict[str, str]) -> Prompt:
    others = "\n\n".join(f"{name} said:\n{msg}" for name, msg in messages.items() if name != role)
    q = f"Question: {task.question} Give the final answer with the number."
    return Prompt(
        [
            {"role": "system", "content": ROLES[role]},
            {
                "role": "user",
                "content": f"Document:\n{task.document}\n\nTeam messages:\n\n{others}\n\n{q}",
            },
        ],
        question=q,
    )


_NUMBER = re.compile(r"\d{3,}")


def extract_answer(text: str) -> str:
    """The first number of 3+ digits in an answer ('' if none): what the agents are asked for."""
    m = _NUMBER.search(text.replace(",", ""))
    return m.group(0) if m else ""


@dataclass
class Comparison:
    task: str
    role: str
    round: int
    occurrences: int
    reused: float
    reused_tokens: int
    prompt_tokens: int
    prefill_s: float
    full_prefill_s: float
    text: str
    full_text: str
    answer_agree: bool
    text_agree: bool
    top1_agree: bool
    kl: float
    correct: bool
    full_correct: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _answer(host: Any, prompt: Prompt, max_new_tokens: int) -> tuple[torch.Tensor, str, float, int]:
    """Prefill through the host's policy, then greedy-decode: (first logits, text, prefill
    seconds, prompt tokens). One prefill serves both the distribution and the answer."""
    enc = host.encode(prompt)
    ids = torch.tensor([enc.ids], device=host.loaded.device)
    model = host.loaded.model
    eos = host._eos_ids()
    with torch.inference_mode():
        cache = host.kv_policy.make_cache(model)
        t0 = time.perf_counter()
        pre = host.kv_policy.prefill(
            model, ids, torch.ones_like(ids), cache, question_len=enc.question_len
        )
        prefill_s = time.perf_counter() - t0
        first = pre.logits[0].float()
        logits, pos, out = pre.logits, int(pre.next_position[0]), []
        for _ in range(max_new_tokens):
            tok = int(logits[0].argmax())
            if tok in eos:
                break
            out.append(tok)
            step = model(
                input_ids=torch.tensor([[tok]], device=ids.device),
                position_ids=torch.tensor([[pos]], device=ids.device),
                use_cache=True,
                **cache_kwargs(model, cache),
            )
            logits, pos = step.logits[:, -1, :], pos + 1
    return (
        first,
        host.tokenizer.decode(out, skip_special_tokens=True).strip(),
        prefill_s,
        len(enc.ids),
    )


def run_team(
    loaded: Any,
    policy: Any,
    tasks: list[Task],
    *,
    roles: list[str] | None = None,
    max_new_tokens: int = 32,
    on_result: Any = None,
) -> list[Comparison]:
    """Run every task through ``policy`` (a KVCOMM) and through full prefill; compare."""
    from apportion.host import Host

    roles = roles or list(ROLES)[:4]
    host = Host(loaded, kv_policy=policy)
    ref = Host(loaded, kv_policy=KVPolicy())
    out: list[Comparison] = []
    for task in tasks:
        policy.share(task.document, loaded.tokenizer)
        messages: dict[str, str] = {}
        for rnd in (1, 2):
            if rnd == 2:
                # written after reading the document: that is their base KV's context
                for role in roles:
                    policy.share(messages[role], loaded.tokenizer, context=task.document)
            for role in roles:
                prompt = (
                    round1_prompt(role, task) if rnd == 1 else round2_prompt(role, task, messages)
                )
                lf, full_text, full_s, n_tokens = _answer(ref, prompt, max_new_tokens)
                lg, text, got_s, _ = _answer(host, prompt, max_new_tokens)
                info = dict(policy.last_info)
                kl = float(
                    torch.nn.functional.kl_div(
                        lg.log_softmax(-1), lf.log_softmax(-1), log_target=True, reduction="sum"
                    )
                )
                if rnd == 1:
                    messages[role] = full_text
                a_full, a_got = extract_answer(full_text), extract_answer(text)
                c = Comparison(
                    task=task.id,
                    role=role,
                    round=rnd,
                    occurrences=info.get("occurrences", 0),
                    reused=info.get("reused", 0),
                    reused_tokens=info.get("reused_tokens", 0),
                    prompt_tokens=n_tokens,
                    prefill_s=got_s,
                    full_prefill_s=full_s,
                    text=text,
                    full_text=full_text,
                    answer_agree=a_full == a_got,
                    text_agree=full_text == text,
                    top1_agree=int(lf.argmax()) == int(lg.argmax()),
                    kl=kl,
                    correct=a_got == task.answer,
                    full_correct=a_full == task.answer,
                )
                out.append(c)
                if on_result is not None:
                    on_result(c)
    return out


def summarize(rows: list[Comparison]) -> dict[str, Any]:
    occ = sum(r.occurrences for r in rows)
    n = max(len(rows), 1)
    return {
        "prompts": len(rows),
        "occurrences": occ,
        "reuse_rate": sum(r.reused for r in rows) / occ if occ else 0.0,
        "token_reuse_rate": sum(r.reused_tokens for r in rows)
        / max(sum(r.prompt_tokens for r in rows), 1),
        "answer_agreement": sum(r.answer_agree for r in rows) / n,
        "text_agreement": sum(r.text_agree for r in rows) / n,
        "top1_agreement": sum(r.top1_agree for r in rows) / n,
        "mean_kl": sum(r.kl for r in rows) / n,
        "accuracy": sum(r.correct for r in rows) / n,
        "full_accuracy": sum(r.full_correct for r in rows) / n,
        "prefill_s": sum(r.prefill_s for r in rows),
        "full_prefill_s": sum(r.full_prefill_s for r in rows),
    }
