"""Single-device attention kernels: local causal attention, the block kernels ring attention and
StreamBP run on, and their fused CUDA backends (flash varlen; cuDNN for dense blocks). Imports nothing else from longtrain.

Importing the package registers the fused CUDA block kernels (:mod:`longtrain.kernels.fused`
imports :mod:`longtrain.kernels.blocks`, never the reverse), so
:func:`~longtrain.kernels.blocks.get_block_kernels` finds them without importing them itself.
"""
from longtrain.kernels import fused  # noqa: F401  (registers the CUDA block kernels)
from longtrain.kernels import cudnn  # noqa: F401  (then the cuDNN/flash selection over them, for CUDA)
