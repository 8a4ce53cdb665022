"""A torch stand-in for Liger's fused linear cross-entropy, for planning it on fake CPU tensors.

Liger's ``LigerFusedLinearCrossEntropyLoss`` runs Triton kernels, which neither this CPU nor a fake
tensor can run. Its algorithm (read in linkedin/Liger-Kernel,
``src/liger_kernel/ops/fused_linear_cross_entropy.py``, ``fused_linear_cross_entropy_forward``,
at commit 00eba634c2e9b5f05badbfb67e9b0a4caba301a2) is restated here op for op, with the
allocations it makes, so that the planner's tracker sees the same memory and the same matmuls:

- the whole loss *and its gradients* are computed in the forward, chunk by chunk of tokens, so
  the full ``[tokens, vocab]`` logits never exist;
- chunk size (:func:`liger_chunk_size`): ``next_power_of_2(ceil(BT / ceil(V / H)))``, at most
  ``BT`` (``chunk_mem_const`` = 1, the default), i.e. the chunk's logits are about as large as
  the ``[BT, H]`` input, 1-2x. Llama-3.2-1B (V = 128256, H = 2048, so ``ceil(V / H)`` = 63):
  1024 tokens per chunk at 32K, 8192 at 256K;
- allocated once: ``grad_input`` (zeros like the ``[BT, H]`` input), ``grad_weight`` (zeros like
  the weight, in the weight's dtype: ``accum_dtype`` defaults to None), the per-token loss in
  fp32, and one ``[chunk, V]`` logits buffer in the input's dtype that every chunk reuses
  (``torch.mm(..., out=)`` on CUDA with grad disabled, as inside the autograd function);
- per chunk: logits = x_chunk @ W^T into the buffer; one kernel computes each row's loss and
  overwrites the logits with their gradient in place (:func:`cross_entropy_grad_`, fp32 inside,
  no temporary of the chunk's size); grad_input[chunk] = grad_logits @ W (``mm(out=)``);
  grad_weight += grad_logits^T @ x_chunk (``addmm(out=grad_weight)``);
- the forward saves grad_input and grad_weight; the backward returns them, scaled only when the
  incoming gradient is not 1.0 (it is 1.0 when the loss is the last op, as in the baseline).

Older Liger releases allocated a fresh logits chunk per iteration (``_input_chunk @ weight.t()``),
so two chunks were briefly alive at once; that costs one more ``[chunk, V]`` tensor at the peak
(about 2 GiB at 256K for the 1B shape) and is not modelled.

The in-place cross-entropy step is one custom op (``plan_hf::cross_entropy_grad_``): on fake
tensors it allocates only the per-row loss, as the Triton kernel writes only that; on real CPU
tensors it computes in fp32 in row blocks (the tests check the stand-in's loss and gradients
against ``F.cross_entropy`` through autograd). The tracker times it as one read of the chunk; the
Triton kernel reads it twice and writes it once (a few ms over a whole step: not modelled).
"""
from __future__ import annotations

import functools
import math

import torch

IGNORE_INDEX = -100
"""Liger's and transformers' default ignored label."""

_ROWS = 256
"""Rows per fp32 block of the real-tensor cross-entropy (bounds its temporaries; CPU only)."""


def liger_chunk_size(num_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk Liger's fused linear cross-entropy uses (module docstring)."""
    inc_factor = -(-vocab // hidden)
    chunk = 1 << max(0, math.ceil(math.log2(max(1, -(-num_tokens // inc_factor)))))
    return min(chunk, num_tokens)


@functools.lru_cache(maxsize=None)
def _ce_grad_op():
    """The in-place cross-entropy op, defined on first use (nothing is registered at import)."""

    @torch.library.custom_op("plan_hf::cross_entropy_grad_", mutates_args={"logits"})
    def cross_entropy_grad_(logits: torch.Tensor, target: torch.Tensor, num_valid: int,
                            ignore_index: int) -> torch.Tensor:
        loss = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        for r0 in range(0, logits.shape[0], _ROWS):
            x = logits[r0:r0 + _ROWS].float()
            t = target[r0:r0 + _ROWS]
            keep = t != ignore_index
            safe = torch.where(keep, t, 0).unsqueeze(-1)
            lse = torch.logsumexp(x, dim=-1)
            loss[r0:r0 + _ROWS] = torch.where(keep, lse - x.gather(-1, safe).squeeze(-1), 0.0) / num_valid
            grad = torch.softmax(x, dim=-1)
            grad.scatter_add_(-1, safe, -torch.ones_like(safe, dtype=grad.dtype))
            grad = grad * (keep.unsqueeze(-1) / num_valid)
            logits[r0:r0 + _ROWS].copy_(grad)
        return loss

    @cross_entropy_grad_.register_fake
    def _(logits, target, num_valid, ignore_index):
        return logits.new_empty(logits.shape[0], dtype=torch.float32)

    return cross_entropy_grad_


def cross_entropy_grad_(logits_cv: torch.Tensor, target_c: torch.Tensor, num_valid: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-row mean-reduced loss (fp32 ``[chunk]``) of ``logits_cv``; overwrites ``logits_cv`` with
    the loss's gradient (``(softmax - onehot) / num_valid``, 0 on ignored rows)."""
    return _ce_grad_op()(logits_cv, target_c, num_valid, ignore_index)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``mean(cross_entropy(x @ W^T, target))`` with both gradients made in the forward (module
    docstring). ``x_th``: [BT, H]; ``weight_vh``: [V, H]; ``target_t``: [BT] (integers)."""

    @staticmethod
    def forward(ctx, x_th, weight_vh, target_t, ignore_index=IGNORE_INDEX):
        num_tokens, hidden = x_th.shape
        vocab = weight_vh.shape[0]
        chunk = liger_chunk_size(num_tokens, hidden, vocab)
        grad_x = torch.zeros_like(x_th)
        grad_w = torch.zeros_like(weight_vh)
        loss_t = torch.zeros(num_tokens, dtype=torch.float32, device=x_th.device)
        num_valid = int((target_t != ignore_index).sum())  # Liger's .item(): a real count in a plan
        logits_buf = torch.empty((chunk, vocab), dtype=x_th.dtype, device=x_th.device)
        for start in range(0, num_tokens, chunk):
            stop = min(start + chunk, num_tokens)
            x_ch = x_th[start:stop]
            logits_cv = logits_buf[: stop - start]
            torch.mm(x_ch, weight_vh.t(), out=logits_cv)
            loss_t[start:stop] = cross_entropy_grad_(logits_cv, target_t[start:stop], num_valid, ignore_index)
            torch.mm(logits_cv, weight_vh, out=grad_x[start:stop])
            torch.addmm(grad_w, logits_cv.t(), x_ch, out=grad_w)
        del logits_buf  # freed before the loss is returned, as Liger releases its buffer
        ctx.save_for_backward(grad_x, grad_w)
        return loss_t.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        # Liger skips the scaling when the incoming gradient is exactly 1 (the loss is the last op);
        # in a plan the tracker answers a fake scalar's value as 1.0, as that steady step has it.
        if float(grad_loss) != 1.0:
            grad_x.mul_(grad_loss)
            grad_w.mul_(grad_loss)
        return grad_x, grad_w, None, None


def fused_linear_cross_entropy(weight_vh: torch.Tensor, x_th: torch.Tensor, target_t: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Liger's ``LigerFusedLinearCrossEntropyLoss()(weight, x, target)`` (same argument order)."""
    return FusedLinearCrossEntropy.apply(x_th, weight_vh, target_t, ignore_index)


__all__ = ["FusedLinearCrossEntropy", "IGNORE_INDEX", "cross_entropy_grad_", "fused_linear_cross_entropy",
           "liger_chunk_size"]
