"""LM head + cross-entropy computed in sequence chunks: the full logits tensor never exists.

At 128K tokens and a 128K vocabulary the logits alone take 32 GiB in bf16 (64 GiB in fp32), more
than the rest of a 1B model's training state. :func:`chunked_lm_loss` walks the tokens in chunks;
for each chunk it forms the logits, the loss and, when gradients are needed, the chunk's
gradients with respect to the hidden states and the head weight, then frees the logits. The
backward only scales those stored gradients by the incoming scalar.

The loss is a weighted sum ``sum_t w_t * CE_t``. The trainer passes ``w_t = 1 / N_valid`` with
``N_valid`` the valid-token count of the whole global batch, so that the sum over ranks and
micro-batches is exactly the global mean (DESIGN.md, loss normalisation). Other weightings (e.g.
per-sequence sums for sequence-level objectives) use the same entry point.

Layouts: ``hidden_nd`` [tokens, dim], ``weight_vd`` [vocab, dim], ``labels_n`` [tokens] with
``IGNORE_INDEX`` for masked tokens, ``weights_n`` [tokens] float.
"""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100


def _chunk_loss_and_grads(h_cd: torch.Tensor, weight_vd: torch.Tensor, labels_c: torch.Tensor,
                          weights_c: torch.Tensor, need_grad: bool):
    acc_dtype = torch.promote_types(h_cd.dtype, torch.float32)  # fp32, or fp64 when testing in fp64
    logits_cv = (h_cd @ weight_vd.to(h_cd.dtype).t()).to(acc_dtype)
    lse_c = torch.logsumexp(logits_cv, dim=-1)
    valid_c = labels_c != IGNORE_INDEX
    safe_labels = torch.where(valid_c, labels_c, 0)
    target_logit_c = logits_cv.gather(1, safe_labels[:, None]).squeeze(1)
    w_c = torch.where(valid_c, weights_c.to(acc_dtype), 0.0)
    loss = (w_c * (lse_c - target_logit_c)).sum()
    if not need_grad:
        return loss, None
    # d loss / d logits = w * (softmax - onehot), computed in place on the logits buffer.
    grad_logits_cv = logits_cv.sub_(lse_c[:, None]).exp_()
    grad_logits_cv.scatter_add_(1, safe_labels[:, None], -torch.ones_like(lse_c)[:, None])
    grad_logits_cv.mul_(w_c[:, None])
    return loss, grad_logits_cv


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_nd, weight_vd, labels_n, weights_n, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        acc_dtype = torch.promote_types(hidden_nd.dtype, torch.float32)
        total = torch.zeros((), dtype=acc_dtype, device=hidden_nd.device)
        grad_h = torch.empty_like(hidden_nd) if need_h else None
        grad_w = torch.zeros_like(weight_vd, dtype=torch.promote_types(weight_vd.dtype, torch.float32)) if need_w else None
        for start in range(0, hidden_nd.shape[0], chunk_size):
            end = min(start + chunk_size, hidden_nd.shape[0])
            h_cd = hidden_nd[start:end]
            loss, g_cv = _chunk_loss_and_grads(h_cd, weight_vd, labels_n[start:end], weights_n[start:end], need_grad)
            total += loss
            if g_cv is None:
                continue
            if need_h:
                grad_h[start:end] = (g_cv.to(h_cd.dtype) @ weight_vd.to(h_cd.dtype)).to(grad_h.dtype)
            if need_w:
                if h_cd.dtype == grad_w.dtype:
                    grad_w.addmm_(g_cv.t(), h_cd)
                else:  # low-precision matmul on the tensor cores, accumulated in fp32 across chunks
                    grad_w += (g_cv.to(h_cd.dtype).t() @ h_cd).float()
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(weight_vd.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else grad_w * scale.to(grad_w.dtype),
                None, None, None)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    weights: Optional[torch.Tensor] = None, chunk_size: int = 4096) -> torch.Tensor:
    """Weighted sum of token cross-entropies of ``hidden @ weight.T`` without building all logits.

    Args:
        hidden: final hidden states, ``[..., dim]``; any leading shape, flattened to tokens.
        weight: LM head weight ``[vocab, dim]`` (fp32 master weight; cast to ``hidden``'s dtype for
            the matmul, softmax in fp32).
        labels: target ids with the shape of ``hidden[..., 0]``; ``IGNORE_INDEX`` is masked.
        weights: per-token weights of the same shape (default 1); masked tokens contribute 0.
        chunk_size: tokens per chunk; peak extra memory is ``chunk_size * vocab`` fp32 values.

    Returns:
        A scalar fp32 (fp64 for fp64 inputs) tensor ``sum_t weights_t * CE_t`` over unmasked tokens, differentiable
        with respect to ``hidden`` and ``weight``.
    """
    hidden_nd = hidden.reshape(-1, hidden.shape[-1])
    labels_n = labels.reshape(-1)
    if labels_n.shape[0] != hidden_nd.shape[0]:
        raise ValueError(f"labels hold {labels_n.shape[0]} tokens but hidden holds {hidden_nd.shape[0]}")
    weights_n = torch.ones_like(labels_n, dtype=torch.float32) if weights is None else weights.reshape(-1)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden_nd = hidden_nd.to(torch.get_autocast_dtype(hidden.device.type))
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLMLoss.apply(hidden_nd, weight, labels_n, weights_n, chunk_size)
