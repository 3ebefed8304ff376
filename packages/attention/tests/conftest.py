import os

# The Triton kernels run on CPU tensors in the interpreter (tests/test_kernels.py). The variable
# must be set before transformers' modeling code is imported (the fixtures and the backends
# import it): a Triton imported by transformers without it leaves @triton.jit functions that
# the interpreter later refuses to call.
os.environ["TRITON_INTERPRET"] = "1"

pytest_plugins = ["apportion.testing.fixtures"]
