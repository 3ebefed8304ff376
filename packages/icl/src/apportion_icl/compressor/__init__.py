"""Learned context compression: the ``arc-compress`` prompt strategy and its training.

After ARC-Encoder (Pilchen et al. 2025, "ARC-Encoder: learning compressed text
representations for large language models"), ICAE (Ge et al. 2024, "In-context Autoencoder
for Context Compression in a Large Language Model") and 500xCompressor (Li et al.): an
encoder reads the context, every ``k`` of its token states are pooled into one vector, and a
learned projector maps each into the frozen decoder's input-embedding space; the decoder
reads those ``ceil(n / k)`` vectors in place of the ``n`` context tokens
(``apportion.base.Prompt.embeds``) and the question as text.

- :mod:`~apportion_icl.compressor.strategy`: the ``arc-compress`` strategy (its docstring
  states the contract, the options and the limits measured here);
- :mod:`~apportion_icl.compressor.model`: the encoder (the served model's first layers),
  mean pooling and the projector;
- :mod:`~apportion_icl.compressor.train`: reconstruction + question-answering training of
  the projector against the frozen decoder (``apportion icl compressor-train``);
- :mod:`~apportion_icl.compressor.artifact`: the versioned, checksummed safetensors file;
- :mod:`~apportion_icl.compressor.texts`: the generated passages it trains and is measured
  on (profiles, needle facts, filler prose).

Nothing here is imported by the plugin's entry point; torch is imported by the modules that
need it.
"""
