"""The entry-point module: tiny, torch-free, registering by import path."""

from apportion import hookimpl

APPORTION_API = ">=2.0,<3"  # the core API range this plugin was written for


@hookimpl
def apportion_register_benchmarks(register):
    register("apportion_passkey.passkey:Passkey", name="passkey")
