"""``generation.chat_template``: the host renders prompts with or without the chat template."""

from apportion.base import Prompt
from apportion.config import parse_config
from apportion.host import Host


def test_the_switch_is_a_validated_generation_option():
    assert parse_config({}).generation.chat_template is True
    assert parse_config({"generation": {"chat_template": False}}).generation.chat_template is False


def test_host_without_the_template_reads_the_plain_text(smollm2):
    prompt = Prompt([{"role": "user", "content": "Some context.\n\nWhat?"}], question="What?")
    templated, plain = Host(smollm2), Host(smollm2, chat_template=False)
    assert "<|im_start|>" in templated.render(prompt.messages)
    assert plain.render(prompt.messages) == "Some context.\n\nWhat?\n"
    enc = plain.encode(prompt)
    assert smollm2.tokenizer.decode(enc.ids) == "Some context.\n\nWhat?\n"
    assert smollm2.tokenizer.decode(enc.ids[-enc.question_len :]) == "What?\n"
    assert len(enc.ids) < len(templated.encode(prompt).ids)


def test_host_without_the_template_generates(smollm2):
    question = "The capital of France is"
    r = Host(smollm2, chat_template=False).generate(question, max_new_tokens=6)[0]
    assert r.new_tokens > 0 and r.text
    assert r.prompt_tokens == len(smollm2.tokenizer.encode(question + "\n"))
