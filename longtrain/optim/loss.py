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
                          weights_c: torch.Tensor, need_grad: bool, per_token: bool = False):
    """(weighted loss of the chunk: a sum, or per token; d loss / d logits or None)."""
    acc_dtype = torch.promote_types(h_cd.dtype, torch.float32)  # fp32, or fp64 when testing in fp64
    logits_cv = (h_cd @ weight_vd.to(h_cd.dtype).t()).to(acc_dtype)
    lse_c = torch.logsumexp(logits_cv, dim=-1)
    valid_c = labels_c != IGNORE_INDEX
    safe_labels = torch.where(valid_c, labels_c, 0)
    target_logit_c = logits_cv.gather(1, safe_labels[:, None]).squeeze(1)
    w_c = torch.where(valid_c, weights_c.to(acc_dtype), 0.0)
    loss = w_c * (lse_c - target_logit_c)
    loss = loss if per_token else loss.sum()
    if not need_grad:
        return loss, None
    # d loss / d logits = w * (softmax - onehot), computed in place on the logits buffer.
    grad_logits_cv = logits_cv.sub_(lse_c[:, None]).exp_()
    grad_logits_cv.scatter_add_(1, safe_labels[:, None], -torch.ones_like(lse_c)[:, None])
    grad_logits_cv.mul_(w_c[:, None])
    return loss, grad_logits_cv


def _add_chunk_grads(g_cv: torch.Tensor, h_cd: torch.Tensor, weight_vd: torch.Tensor,
                     grad_h: Optional[torch.Tensor], grad_w: Optional[torch.Tensor], start: int, end: int) -> None:
    """Write the chunk's hidden-state gradient into ``grad_h[start:end]`` and add its weight gradient."""
    if grad_h is not None:
        grad_h[start:end] = (g_cv.to(h_cd.dtype) @ weight_vd.to(h_cd.dtype)).to(grad_h.dtype)
    if grad_w is not None:
        if h_cd.dtype == grad_w.dtype:
            grad_w.addmm_(g_cv.t(), h_cd)
        else:  # low-precision matmul on the tensor cores, accumulated in fp32 across chunks
            grad_w += (g_cv.to(h_cd.dtype).t() @ h_cd).float()


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
            if g_cv is not None:
                _add_chunk_grads(g_cv, h_cd, weight_vd, grad_h, grad_w, start, end)
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(weight_vd.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else grad_w * scale.to(grad_w.dtype),
                None, None, None)


class _ChunkedSequenceLoss(torch.autograd.Function):
    """Per-sequence sums ``[B]``: the forward keeps nothing but its inputs; the backward recomputes
    each chunk's logits and scales its gradients by the upstream gradient of the token's sequence
    (a weight gradient per sequence would not fit, so it cannot be formed in the forward)."""

    @staticmethod
    def forward(ctx, hidden_nd, weight_vd, labels_n, weights_n, rows_n, num_rows: int, chunk_size: int):
        acc_dtype = torch.promote_types(hidden_nd.dtype, torch.float32)
        totals = torch.zeros(num_rows, dtype=acc_dtype, device=hidden_nd.device)
        for start in range(0, hidden_nd.shape[0], chunk_size):
            end = min(start + chunk_size, hidden_nd.shape[0])
            token_loss = _chunk_loss_and_grads(hidden_nd[start:end], weight_vd, labels_n[start:end],
                                               weights_n[start:end], False, per_token=True)[0]
            totals.index_add_(0, rows_n[start:end], token_loss)
        ctx.save_for_backward(hidden_nd, weight_vd, labels_n, weights_n, rows_n)
        ctx.chunk_size = chunk_size
        return totals

    @staticmethod
    def backward(ctx, grad_rows):
        hidden_nd, weight_vd, labels_n, weights_n, rows_n = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden_nd) if need_h else None
        grad_w = torch.zeros_like(weight_vd, dtype=torch.promote_types(weight_vd.dtype, torch.float32)) if need_w else None
        for start in range(0, hidden_nd.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden_nd.shape[0])
            h_cd = hidden_nd[start:end]
            # Upstream gradient of each token's sequence folded into its weight.
            w_c = weights_n[start:end] * grad_rows[rows_n[start:end]].to(weights_n.dtype)
            _, g_cv = _chunk_loss_and_grads(h_cd, weight_vd, labels_n[start:end], w_c, True)
            _add_chunk_grads(g_cv, h_cd, weight_vd, grad_h, grad_w, start, end)
        return (grad_h, None if grad_w is None else grad_w.to(weight_vd.dtype), None, None, None, None, None)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    weights: Optional[torch.Tensor] = None, chunk_size: int = 4096,
                    reduction: str = "sum") -> torch.Tensor:
    """Weighted sum of token cross-entropies of ``hidden @ weight.T`` without building all logits.

    Args:
        hidden: final hidden states, ``[..., dim]``; any leading shape, flattened to tokens.
        weight: LM head weight ``[vocab, dim]`` (fp32 master weight; cast to ``hidden``'s dtype for
            the matmul, softmax in fp32).
        labels: target ids with the shape of ``hidden[..., 0]``; ``IGNORE_INDEX`` is masked.
        weights: per-token weights of the same shape (default 1); masked tokens contribute 0.
        chunk_size: tokens per chunk; peak extra memory is ``chunk_size * vocab`` fp32 values.
        reduction: ``sum`` (one scalar; the gradients are formed in the forward, so the backward
            costs nothing) or ``sequence`` (``[B]`` sums per sequence of a ``[B, S, dim]`` input,
            e.g. the negative log-probability of each sequence for DPO-style objectives; the
            backward recomputes the logits chunk by chunk).

    Returns:
        fp32 (fp64 for fp64 inputs) ``sum_t weights_t * CE_t`` over unmasked tokens: a scalar, or
        ``[B]`` for ``reduction="sequence"``; differentiable with respect to ``hidden`` and ``weight``.
    """
    if reduction not in ("sum", "sequence"):
        raise ValueError(f"reduction must be 'sum' or 'sequence', got {reduction!r}")
    if reduction == "sequence" and hidden.dim() != 3:
        raise ValueError(f"reduction='sequence' needs hidden [B, S, dim], got shape {tuple(hidden.shape)}")
    hidden_nd = hidden.reshape(-1, hidden.shape[-1])
    labels_n = labels.reshape(-1)
    if labels_n.shape[0] != hidden_nd.shape[0]:
        raise ValueError(f"labels hold {labels_n.shape[0]} tokens but hidden holds {hidden_nd.shape[0]}")
    weights_n = torch.ones_like(labels_n, dtype=torch.float32) if weights is None else weights.reshape(-1)
    if torch.is_autocast_enabled(hidden.device.type):
        hidden_nd = hidden_nd.to(torch.get_autocast_dtype(hidden.device.type))
    with torch.autocast(hidden.device.type, enabled=False):
        if reduction == "sequence":
            rows_n = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(hidden.shape[1])
            return _ChunkedSequenceLoss.apply(hidden_nd, weight, labels_n, weights_n, rows_n, hidden.shape[0],
                                              chunk_size)
        return _ChunkedLMLoss.apply(hidden_nd, weight, labels_n, weights_n, chunk_size)
