"""Squeezed Attention (Hooper et al., 2024): attention over a long *fixed* context at a
fraction of the keys.

Offline (:mod:`.index`): the context's keys are clustered per layer and KV head (K-means),
the fine centroids are clustered again (two-level hierarchy), and thresholds on the
estimated attention mass of a cluster are calibrated so that a query selects about
``budget`` of the context's keys. Online (:mod:`.backend`): each new query scores the coarse
centroids, then the fine centroids under the coarse clusters it kept, and attends exactly
to the keys of the selected clusters plus every token after the context (the question and
the generated tokens). By default (``question_share``) half of the budget instead holds the
context keys the question's queries attended to most, kept at every decode step (see
:mod:`.backend`); ``question_share=0`` is the per-step selection alone.

Modules: :mod:`.backend` (the ``squeezed`` component), :mod:`.index` (the centroid index
and its calibration), :mod:`.kmeans` (batched K-means), :mod:`.kernels` (centroid scoring,
index compaction and sparse decode, each in Triton and as a torch reference).
"""

from apportion_attention.squeezed.backend import Squeezed, SqueezedConfig
from apportion_attention.squeezed.index import LayerIndex, build_layer_index

__all__ = ["LayerIndex", "Squeezed", "SqueezedConfig", "build_layer_index"]
