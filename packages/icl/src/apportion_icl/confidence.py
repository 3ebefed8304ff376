"""The model's confidence in its own first answer: greedy answer, then the geometric mean
of the probabilities it gave its answer tokens (teacher-forced, one forward pass)."""

from __future__ import annotations

import math
from typing import Any

from apportion.base import Prompt


def first_answer(
    loaded: Any, messages: list[dict[str, str]], max_new_tokens: int = 16
) -> tuple[str, float]:
    """(answer, confidence in [0, 1]). An empty answer has confidence 0."""
    import torch
    from apportion.host import Host

    host = Host(loaded)
    answer = host.generate(Prompt(messages), max_new_tokens=max_new_tokens)[0].text
    if not answer:
        return answer, 0.0
    prompt_ids = host.encode(Prompt(messages)).ids
    ans_ids = loaded.tokenizer.encode(answer, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + ans_ids], device=loaded.device)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    picked = logp.gather(-1, torch.tensor(ans_ids, device=logp.device)[:, None])[:, 0]
    return answer, math.exp(float(picked.mean()))
