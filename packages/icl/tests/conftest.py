import pytest

pytest_plugins = ["apportion.testing.fixtures"]


@pytest.fixture(scope="session", autouse=True)
def _session_llm(smollm2):
    """Strategies used without ``bind`` load their model on first use; in the tests they get
    the session's SmolLM2 instead of loading a copy each."""
    from apportion_icl import runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "load_llm", lambda spec=None: smollm2)
        yield smollm2


@pytest.fixture(scope="session")
def tok(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="session")
def pool():
    from apportion_icl import data

    return [e.as_demo() for e in data.classification("pool")]
