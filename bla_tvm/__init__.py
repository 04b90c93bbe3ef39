"""bla_tvm: Blurry Window Attention kernels compiled with TVM, callable from PyTorch.

Importing the package loads no compiler: kernels are loaded through tvm_ffi, and ``import tvm`` happens only
when a kernel has to be built.
"""

from . import nn
from .api import blurry_window_attention
from .decode import InPlaceSteps, decode_step
from .decode_graph import DecodeGraph
from .generate import generate
from .params import BLAParams
from .reference import bla_chunked, bla_quadratic, bla_recurrent
from .state import BLAState

__all__ = [
    "BLAParams", "BLAState", "DecodeGraph", "InPlaceSteps", "blurry_window_attention", "decode_step", "generate",
    "bla_chunked", "bla_quadratic", "bla_recurrent", "nn",
]  # fmt: skip
