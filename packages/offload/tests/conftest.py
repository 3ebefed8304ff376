pytest_plugins = ["apportion.testing.fixtures"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deepspeed: runs a real DeepSpeed ZeRO step (slow to import)"
    )
