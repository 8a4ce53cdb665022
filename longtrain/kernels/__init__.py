"""Single-device attention kernels: the reference block kernels, the fused executors (flash
attention's varlen ops on CUDA, the CPU flash op, cuDNN for dense blocks), the one dispatch that
chooses among them for every caller (:mod:`longtrain.kernels.dispatch`), and local attention.
Imports nothing else from longtrain; importing it registers nothing."""
