"""Batches: which packed rows form each step's global batch, and rows as tensors."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from longtrain.trainer.data.packing import ROW_ARRAYS, PackedData


class GlobalBatchSampler:
    """Rows of each step's global batch, a function of (step, seed, global batch size) only.

    The data is an endless stream: position ``p = step * G + i`` is row ``perm(seed, e)[p % N]`` of
    epoch ``e = p // N``, each epoch a fresh permutation. The layout (dp degree, accumulation) only
    decides which rank sees which rows, so runs with different layouts train on the same batches.
    """

    def __init__(self, num_rows: int, global_batch_size: int, seed: int) -> None:
        if num_rows < 1 or global_batch_size < 1:
            raise ValueError(f"need num_rows >= 1 and data.global_batch_size >= 1, got {num_rows}, {global_batch_size}")
        self.num_rows, self.global_batch_size, self.seed = num_rows, global_batch_size, seed
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            gen = np.random.Generator(np.random.PCG64([abs(int(self.seed)), epoch]))
            self._perms[epoch] = gen.permutation(self.num_rows)
        return self._perms[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """The ``G`` row indices of step ``step``, in global order."""
        pos = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        epochs, within = pos // self.num_rows, pos % self.num_rows
        out = np.empty_like(pos)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out

    def local_micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                            grad_accum: int) -> List[np.ndarray]:
        """This rank's ``grad_accum`` micro-batches of step ``step``.

        The global rows are cut into ``grad_accum * dp_size`` contiguous blocks of
        ``micro_batch_size``; micro-batch ``m`` of rank ``r`` is block ``m * dp_size + r``.

        Raises:
            ValueError: ``G != micro_batch_size * grad_accum * dp_size``.
        """
        g, per_step = self.global_batch_size, micro_batch_size * grad_accum * dp_size
        if g != per_step:
            fix = f"set data.global_batch_size={per_step}"
            if g % (micro_batch_size * dp_size) == 0:
                fix += f" or trainer.grad_accum={g // (micro_batch_size * dp_size)}"
            raise ValueError(f"data.global_batch_size={g} must equal data.micro_batch_size ({micro_batch_size}) "
                             f"x trainer.grad_accum ({grad_accum}) x data-parallel degree ({dp_size}) "
                             f"= {per_step}; {fix}")
        rows = self.global_indices(step)
        return [rows[(m * dp_size + dp_rank) * micro_batch_size:][:micro_batch_size] for m in range(grad_accum)]


def collate(packed: PackedData, rows: np.ndarray) -> Dict[str, torch.Tensor]:
    """Rows ``rows`` of ``packed`` as int64 tensors ``[B, S]``: input_ids, labels, position_ids, doc_ids."""
    rows = np.asarray(rows, dtype=np.int64)
    return {name: torch.from_numpy(np.asarray(getattr(packed, name)[rows], dtype=np.int64)) for name in ROW_ARRAYS}


def collate_domains(packed: PackedData, rows: np.ndarray) -> Optional[torch.Tensor]:
    """Domain ids of rows ``rows`` of ``packed`` as an int64 tensor ``[B, S]`` (-1 on padding; names in
    ``packed.domain_names``), or None when the data has no domains."""
    if packed.domains is None:
        return None
    return torch.from_numpy(np.asarray(packed.domains[np.asarray(rows, dtype=np.int64)], dtype=np.int64))
