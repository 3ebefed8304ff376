import os

# The Triton kernels run on CPU tensors in the interpreter (tests/test_kernels.py). The variable
# must be set before transformers' modeling code is imported, which `import apportion_attention`
# does (it registers the attention functions): a Triton imported by transformers without it
# leaves @triton.jit functions that the interpreter later refuses to call.
os.environ["TRITON_INTERPRET"] = "1"

pytest_plugins = ["apportion.testing.fixtures"]
