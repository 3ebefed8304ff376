"""Strategies run the model they are bound to; unbound, they load their own, on the instance."""

from apportion_icl import runtime
from apportion_icl.latent import Latent
from apportion_icl.verify import VerifyLoop, VerifyLoopConfig


def test_bind_hands_the_model_to_the_strategy(smollm2):
    s = Latent()
    assert s.bind(smollm2) is s and s.llm is smollm2


def test_unbound_strategy_loads_its_model_option_once_per_instance(monkeypatch, smollm2):
    asked = []
    monkeypatch.setattr(runtime, "load_llm", lambda spec=None: asked.append(spec) or smollm2)
    s = VerifyLoop(VerifyLoopConfig(model="smollm2"))
    assert s.llm is smollm2 and s.llm is smollm2
    assert [(a.name, a.device, a.dtype) for a in asked] == [("smollm2", "cpu", "float32")]
    assert VerifyLoop().llm is smollm2 and len(asked) == 2  # nothing shared between instances
    bound = VerifyLoop().bind(smollm2)
    assert bound.llm is smollm2 and len(asked) == 2  # a bound strategy loads nothing
