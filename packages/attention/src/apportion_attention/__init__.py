"""apportion-attention: attention backends for apportion's host and for plain transformers.

Importing the package registers its attention functions in transformers'
``AttentionInterface`` and ``AttentionMaskInterface`` (:mod:`apportion_attention.hf`), so
right after ``import apportion_attention`` any Llama-like model takes
``attn_implementation="apportion-squeezed"`` (or ``apportion-longheads``,
``apportion-distattention``, ``apportion-ssa``). That imports transformers and torch.

apportion finds the package's components through the separate top-level module
:mod:`apportion_attention_plugin` (the entry point), which does not import this package:
``apportion plugins`` stays torch-free.
"""

__version__ = "0.1.0"

from apportion_attention import hf as hf  # noqa: E402  (registers; needs __version__ above)

__all__ = ["__version__", "hf"]
