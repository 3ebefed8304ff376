"""Fixtures for the lm-eval adapter tests (run by the ``lm-eval`` nox session): a task written
as local YAML over local JSON, and the embedded SmolLM2's converted folder for lm-eval's ``hf``
model. Nothing is fetched from a hub."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest_plugins = ["apportion.testing.fixtures"]

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
FILLER = [
    "The museum opens at nine and closes at five.",
    "A light rain fell over the harbour all afternoon.",
    "The committee met twice before the vote was held.",
    "Fresh bread is delivered to the market every morning.",
    "The old bridge was repaired during the summer.",
    "Several students stayed late to finish the experiment.",
    "The train to the coast leaves from the second platform.",
    "A new library was built next to the town hall.",
    "The garden behind the school grows tomatoes and beans.",
    "Most of the shops on the main street close on Sundays.",
]

#: the answer is prompted as a completion
GEN_PROMPT = "{{context}}\\n\\nQuestion: {{question}}\\nAnswer: The code of the {{color}} door is"
GEN_TASK = """\
task: apportion_niah_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{prompt}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
"""

MC_TASK = """\
task: apportion_niah_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\n\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def make_items(n: int = 20, seed: int = 0) -> list[dict]:
    """``n`` needle items: filler sentences with one fact ("the code of the <color> door is
    <number>") at a random place; the question asks for the number (the answer is prompted as
    a completion, which SmolLM2 fills in without a chat template), the choices are four
    colours (the multiple-choice task asks which door has the code)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        color = rng.choice(COLORS)
        code = str(rng.randint(100, 999))
        body = [rng.choice(FILLER) for _ in range(14)]
        body.insert(rng.randint(0, len(body)), f"The code of the {color} door is {code}.")
        choices = [color, *rng.sample([c for c in COLORS if c != color], 3)]
        rng.shuffle(choices)
        items.append(
            {
                "id": i,
                "color": color,
                "context": " ".join(body),
                "question": f"What is the code of the {color} door?",
                "answer": code,
                "mc_question": f"Which door has the code {code}?",
                "choices": [f" the {c} door" for c in choices],
                "label": choices.index(color),
            }
        )
    return items


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """A folder of two lm-eval tasks over one local JSON file of 20 items."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    items = make_items()
    gen = root / "niah_gen.jsonl"
    gen.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    mc = root / "niah_mc.jsonl"
    mc_items = [dict(x, question=x["mc_question"]) for x in items]
    mc.write_text("\n".join(json.dumps(x) for x in mc_items) + "\n")
    (root / "apportion_niah_gen.yaml").write_text(GEN_TASK.format(data=gen, prompt=GEN_PROMPT))
    (root / "apportion_niah_mc.yaml").write_text(MC_TASK.format(data=mc))
    os.environ.setdefault("HF_DATASETS_CACHE", str(root / "datasets-cache"))
    return root


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The embedded SmolLM2's converted HF folder, which lm-eval's ``hf`` model loads."""
    from apportion.host.model import converted_embedded

    return converted_embedded()
