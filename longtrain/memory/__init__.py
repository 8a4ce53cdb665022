"""Activation memory: StreamBP, activation offload and the decoder-layer wrappers that apply them
(and gradient checkpointing). Imports kernels and models, nothing above them."""
from longtrain.memory.streambp import auto_chunk_size, chunk_working_set_bytes, is_streamable, streamed_layer
from longtrain.memory.wrappers import apply_checkpointing, apply_streambp, unwrap_layers

__all__ = ["apply_checkpointing", "apply_streambp", "unwrap_layers", "is_streamable", "auto_chunk_size",
           "chunk_working_set_bytes", "streamed_layer"]
