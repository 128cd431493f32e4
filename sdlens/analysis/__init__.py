"""Measures of attention, shared by the figures (``sdlens.viz``), the sweep's records and report
(``sdlens.sweep``) and the benchmarks.

- ``shares``: how the cross-attention mass splits over the key slots (a word's share of it; the
  start, word, end, padding and T5 slots' shares);
- ``localisation``: how well a map finds a true mask (IoU of its upper half, peak on it), and a
  map's entropy and peak position;
- ``segmentation``: a trace's self-attention rows, their principal components as colours and
  their k-means clusters.

Nothing here draws: ``sdlens.viz`` draws what these compute.
"""

from .localisation import localisation, map_entropy, peak_position
from .segmentation import kmeans, pca_rgb, segment, self_attention_rows
from .shares import JOINT_SLOT_KINDS, SLOT_KINDS, kind_shares, slot_shares

__all__ = [
    "JOINT_SLOT_KINDS",
    "SLOT_KINDS",
    "kind_shares",
    "kmeans",
    "localisation",
    "map_entropy",
    "pca_rgb",
    "peak_position",
    "segment",
    "self_attention_rows",
    "slot_shares",
]
