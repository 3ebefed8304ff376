import pytest

pytest_plugins = ["apportion.testing.fixtures"]


@pytest.fixture(scope="session", autouse=True)
def _shared_llm(request):
    """Strategies that run the LLM use the session's SmolLM2 instead of loading their own."""
    if "smollm2" in request.fixturenames or True:
        from apportion_icl import runtime

        runtime.share(request.getfixturevalue("smollm2"))


@pytest.fixture(scope="session")
def tok(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="session")
def pool():
    from apportion_icl import data

    return [e.as_demo() for e in data.classification("pool")]
