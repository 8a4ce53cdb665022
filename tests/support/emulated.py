"""Stand-ins for CUDA's attention ops with the same contracts, written for CPU tensors, so the CUDA
executors' plumbing (gathers, cumulative lengths, lse layouts, backward from merged stats) is tested
on CPU against the reference kernels."""
from __future__ import annotations

import torch


class EmulatedFlash:
    """Stand-ins for ``aten._flash_attention_forward/_backward`` (varlen form) written out densely:
    per sequence of the cumulative lengths, GQA by head groups, causal aligned bottom-right, lse
    [H, total_q] fp32; the backward uses the given out and lse (as flash attention does)."""

    @staticmethod
    def _pieces(cu_q, cu_k):
        return [(slice(a, b), slice(c, d)) for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(),
                                                                   cu_k[:-1].tolist(), cu_k[1:].tolist())]

    @staticmethod
    def _probs_mask(q, k, causal, scale):
        group = q.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
        nq, nk = q.shape[0], k.shape[0]
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq) if causal else torch.ones(nq, nk, dtype=torch.bool)
        return scores, mask, group

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, scale=None):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and dropout == 0.0
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
        for qs, ks in self._pieces(cu_q, cu_k):
            scores, mask, group = self._probs_mask(q[qs], k[ks], causal, scale)
            scores = scores.masked_fill(~mask, float("-inf"))
            lse[:, qs] = torch.logsumexp(scores, -1).float()
            probs = torch.softmax(scores, -1)
            out[qs] = torch.einsum("hqk,khd->qhd", probs, v[ks].double().repeat_interleave(group, 1)).to(q.dtype)
        return out, lse, torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64), torch.empty(0)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, rng, unused, scale=None):
        assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
        for qs, ks in self._pieces(cu_q, cu_k):
            scores, mask, group = self._probs_mask(q[qs], k[ks], causal, scale)
            probs = torch.exp(scores - lse[:, qs].double()[..., None]) * mask
            do, vv = dout[qs].double(), v[ks].double().repeat_interleave(group, 1)
            delta = (do * out[qs].double()).sum(-1).t()[..., None]  # [H, q, 1]
            dv_h = torch.einsum("hqk,qhd->khd", probs, do)
            ds = probs * (torch.einsum("qhd,khd->hqk", do, vv) - delta)
            dq[qs] = torch.einsum("hqk,khd->qhd", ds, k[ks].double().repeat_interleave(group, 1)) * scale
            dk_h = torch.einsum("hqk,qhd->khd", ds, q[qs].double()) * scale
            dk[ks] += dk_h.unflatten(1, (-1, group)).sum(2)
            dv[ks] += dv_h.unflatten(1, (-1, group)).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def emulated_cudnn_ops():
    """The cuDNN ops' signatures on the CPU flash op (lse [B, H, S, 1] as cuDNN returns it)."""
    def forward(q, k, v, bias, lse_flag, p, causal, debug, *, scale):
        assert bias is None and lse_flag and p == 0.0 and q.shape[1] == k.shape[1]  # GQA expanded
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale)
        empty = torch.empty(())
        return out, lse.unsqueeze(-1), None, None, q.shape[2], k.shape[2], empty, empty, None

    def backward(dout, q, k, v, out, lse, seed, offset, bias, cu_q, cu_k, max_q, max_k, p, causal, *, scale):
        assert lse.shape == (*q.shape[:3], 1) and max_q == q.shape[2] and max_k == k.shape[2]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
            lse.squeeze(-1).contiguous(), 0.0, causal, scale=scale)
    return lambda: (forward, backward)
