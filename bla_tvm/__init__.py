"""bla_tvm: Blurry Window Attention kernels compiled with TVM, callable from PyTorch."""

from .params import BLAParams
from .reference import bla_chunked, bla_quadratic, bla_recurrent

__all__ = ["BLAParams", "bla_chunked", "bla_quadratic", "bla_recurrent"]
