"""Torch modules built on the BLA kernels: ``BlurryWindowAttention`` (an attention layer in FLA's conventions),
the ``BLACache`` it carries between calls, and its ``ShortConvolution``."""

from .attention import FEATURE_MAPS, BlurryWindowAttention
from .cache import BLACache, LayerState
from .conv import ShortConvolution

__all__ = ["BLACache", "BlurryWindowAttention", "FEATURE_MAPS", "LayerState", "ShortConvolution"]
