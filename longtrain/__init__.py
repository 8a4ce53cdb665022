"""longtrain: one trainer for very long sequences (sequence parallelism, ZeRO, StreamBP, MoE)."""

__version__ = "0.1.0"
