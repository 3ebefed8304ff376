"""``Host.generate_ids``: prompts given as token ids (a host app that renders its own prompts),
and the generated token ids every result carries."""

from __future__ import annotations

import pytest
from apportion.base import Prompt
from apportion.errors import ConfigError
from apportion.host import Host

QUESTION = "What is the capital of France? Answer in one word."


def test_ids_generate_as_the_rendered_prompt(smollm2):
    host = Host(smollm2)
    prompt = Prompt([{"role": "user", "content": f"Paris is in France.\n\n{QUESTION}"}], QUESTION)
    enc = host.encode(prompt)
    via_text = host.generate(prompt, max_new_tokens=8)[0]
    via_ids = host.generate_ids([enc.ids], enc.question_len, max_new_tokens=8)[0]
    assert via_ids.text == via_text.text and via_ids.prompt_tokens == len(enc.ids)
    assert via_ids.token_ids == via_text.token_ids and via_ids.token_ids
    assert smollm2.tokenizer.decode(via_ids.token_ids).strip() == via_ids.text
    assert "token_ids" not in via_ids.as_dict()


def test_bad_rows_are_refused(smollm2):
    host = Host(smollm2)
    with pytest.raises(ConfigError, match="empty"):
        host.generate_ids([[]])
    with pytest.raises(ConfigError, match="2 question lengths for 1 prompts"):
        host.generate_ids([[1, 2, 3]], [1, 1])
    assert host.generate_ids([]) == []
