"""Model-agnostic distributed code: process groups, collectives, sequence sharding, Ulysses and ring
attention, ZeRO through DeepSpeed, and the fixed order that applies them (``apply.py``)."""
