"""The entry-point module: tiny, torch-free, registering by import path."""

from apportion import hookimpl

APPORTION_API = ">=1.0,<2"  # the core API range this plugin was written for


@hookimpl
def apportion_register_benchmarks(register):
    register(
        "passkey",
        "apportion_passkey.passkey:Passkey",
        config="apportion_passkey.passkey:PasskeyConfig",
        summary="find a 5-digit pass key hidden in repeated filler text",
    )
