pytest_plugins = ["apportion.testing.fixtures"]
