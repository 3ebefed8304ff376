"""The former entry-point module, kept for installs whose metadata still names
``apportion_attention.plugin`` (an editable install from before the move; reinstall to refresh).

The entry point is now the top-level :mod:`apportion_attention_plugin`, which loads without
importing this package. Importing this module imports the package, hence transformers and torch.
"""

from apportion_attention_plugin import (  # noqa: F401  (pluggy finds the hook implementations here)
    APPORTION_API,
    apportion_model_loaded,
    apportion_register_attention,
)
