"""The memory wrappers (activation checkpointing, StreamBP) and the streaming contract of attention.

Tolerances: checkpointing recomputes the very same forward, so its gradients match plain backprop
to rounding (fp64, 1e-12 relative checked); StreamBP sums the same terms in another order (per
chunk, K/V projections apart): fp64 agrees to ~1e-14 relative, 1e-10 is checked, as in
tests/test_streambp.py. A dropped chunk or key prefix moves gradients by 1e-2 or more.
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

from longtrain.kernels.attention import ChunkKeys, local_attention
from longtrain.memory import apply_checkpointing, apply_streambp, unwrap_layers
from longtrain.models import Transformer, get_model_args
from longtrain.models.llama import DecoderLayer
from longtrain.optim.loss import chunked_lm_loss
from longtrain.parallel.ring import RingAttention
from longtrain.parallel.ulysses import UlyssesAttention

REPO = Path(__file__).resolve().parents[1]
B, S = 2, 40
DOCS = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [0] * 25 + [1] * 1 + [2] * 14])


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    net = Transformer(get_model_args("tiny", num_layers=3, qk_norm=True))
    net.init_weights()
    net.double()
    for p in net.parameters():  # non-trivial norm weights, so their gradients are checked too
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def _loss_and_grads(net: Transformer, ids: torch.Tensor, labels: torch.Tensor):
    net.zero_grad(set_to_none=True)
    loss = chunked_lm_loss(net.hidden_states(ids, doc_ids=DOCS), net.output_weight, labels, chunk_size=16)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}


def _inputs(net: Transformer):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, net.args.vocab_size, (B, S), generator=gen)
    return ids, torch.randint(0, net.args.vocab_size, (B, S), generator=gen)


@pytest.mark.parametrize("wrap", ["checkpointing", "streambp"])
def test_wrapping_keeps_names_and_gives_the_plain_gradients(wrap):
    net = _model()
    ids, labels = _inputs(net)
    keys, names = list(net.state_dict()), [n for n, _ in net.named_parameters()]
    want_loss, want = _loss_and_grads(net, ids, labels)
    if wrap == "checkpointing":
        apply_checkpointing(net)
    else:
        apply_streambp(net, 13, offload=False)
    assert list(net.state_dict()) == keys and [n for n, _ in net.named_parameters()] == names
    assert all(isinstance(layer, DecoderLayer) and type(layer) is not DecoderLayer for layer in net.layers)
    got_loss, got = _loss_and_grads(net, ids, labels)
    tol = 1e-12 if wrap == "checkpointing" else 1e-10
    assert got_loss == pytest.approx(want_loss, rel=tol)
    for name, g in want.items():
        assert ((got[name] - g).abs().max() / g.abs().max()).item() < tol, name
    net.eval()  # outside training the wrapped forward is the plain one
    with torch.no_grad():
        wrapped_out = net(ids, doc_ids=DOCS)
        unwrap_layers(net)
        assert all(type(layer) is DecoderLayer for layer in net.layers)
        assert not hasattr(net.layers[0], "streambp_chunk")
        assert torch.equal(wrapped_out, net(ids, doc_ids=DOCS))


def test_a_layer_takes_one_wrapper():
    net = _model()
    apply_streambp(net, 8, offload=False)
    for again in (lambda: apply_streambp(net, 16, offload=False), lambda: apply_checkpointing(net)):
        with pytest.raises(ValueError, match="already wrapped"):
            again()
    assert {layer.streambp_chunk for layer in net.layers} == {8}  # the refused call changed nothing
    unwrap_layers(net)
    apply_checkpointing(net)
    with pytest.raises(ValueError, match="memory.checkpointing and memory.streambp.enabled are exclusive"):
        apply_streambp(net, 8, offload=False)
    with pytest.raises(ValueError, match="memory.streambp.chunk_size must be positive"):
        apply_streambp(_model(), 0, offload=False)


def test_each_apply_logs_one_line(caplog):
    net = _model()
    with caplog.at_level("INFO", logger="longtrain.memory.wrappers"):
        apply_streambp(net, 8, offload=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "longtrain.memory.wrappers"]
    assert len(lines) == 1 and "chunks of 8 tokens" in lines[0] and "every part" in lines[0], lines


@pytest.mark.parametrize("attention", ["local", "ring"])
def test_a_param_gather_is_used_once_for_the_forward_and_once_for_the_backward(attention):
    """The gathered (ZeRO-3) path on CPU with a counting stand-in for the gather: the same
    gradients (fp64, 1e-10), two gathers per layer, each of the layer's parameters; under ring
    attention (a ring of one here), whose attention core runs whole, as under local attention."""
    net = _model()
    ids, labels = _inputs(net)
    want_loss, want = _loss_and_grads(net, ids, labels)
    if attention == "ring":
        net.set_attention_fn(RingAttention(None))
    apply_streambp(net, 13, offload=False)
    gathered = []

    def gather(params):
        gathered.append(len(params))
        return contextlib.nullcontext()
    for layer in net.layers:
        layer.set_param_gather(gather)
    got_loss, got = _loss_and_grads(net, ids, labels)
    assert gathered == [len(list(net.layers[0].parameters()))] * (2 * len(net.layers))
    assert got_loss == pytest.approx(want_loss, rel=1e-10)
    for name, g in want.items():
        assert ((got[name] - g).abs().max() / g.abs().max()).item() < 1e-10, name


@pytest.mark.parametrize("gathered", [False, True])
def test_the_streamed_forward_never_holds_the_whole_mlp_working_set(gathered):
    """A streamed layer's forward runs its MLP chunk by chunk too: no tensor of the forward has the
    whole sequence's [S, intermediate] shape (the backward's chunks are checked by the gradients)."""
    from longtrain.plan.tracker import StepTracker

    net = _model()
    ids, _ = _inputs(net)
    apply_streambp(net, 13, offload=False)
    if gathered:  # the ZeRO-3 path computes the forward from the chunk functions
        for layer in net.layers:
            layer.set_param_gather(lambda params: contextlib.nullcontext())
    with StepTracker() as tracker:
        net.hidden_states(ids, doc_ids=DOCS).sum()
    shapes = [shape for _, shape, _, _ in tracker.origin.values()]
    inner = net.args.intermediate_size
    assert any(s[-1:] == (inner,) and 13 in s for s in shapes)  # the chunks ran
    assert not any(s[-1:] == (inner,) and S in s for s in shapes)


def test_the_streamed_backward_under_ring_holds_no_whole_sequence_mlp_or_norm():
    """Under ring attention only the attention core runs whole in the backward: no tensor has the
    whole sequence's [S, intermediate] shape, and the input norm's statistics and RoPE's rotation
    exist per chunk only (a whole recomputation of the attention half makes both for all S)."""
    from longtrain.plan.tracker import StepTracker

    net = _model()
    ids, labels = _inputs(net)
    net.set_attention_fn(RingAttention(None))
    apply_streambp(net, 13, offload=False)
    loss = chunked_lm_loss(net.hidden_states(ids, doc_ids=DOCS), net.output_weight, labels, chunk_size=16)
    with StepTracker() as tracker:
        loss.backward()
    shapes = [shape for op, shape, _, _ in tracker.origin.values()]
    inner = net.args.intermediate_size
    assert any(s[-1:] == (inner,) and 13 in s for s in shapes)  # the chunks ran
    assert not any(s[-1:] == (inner,) and S in s for s in shapes)
    whole = [(op, shape) for op, shape, _, _ in tracker.origin.values() if op in ("rsqrt", "neg") and S in shape]
    assert not whole, whole


def test_install_param_gather_reaches_every_streamed_layer():
    pytest.importorskip("deepspeed")
    from longtrain.parallel.zero import install_param_gather
    net = _model()
    assert install_param_gather(net) == 0  # plain layers take no gather
    apply_streambp(net, 8, offload=False)
    assert install_param_gather(net) == len(net.layers)
    assert all(callable(layer.param_gather) for layer in net.layers)


def test_chunk_keys_of_each_attention_function():
    """Local attention streams with its own keys; Ulysses of degree 1 around it does the same;
    ring attention, and Ulysses around ring (hybrid), cannot stream. Ulysses of degree 2 is checked
    under gloo in tests/test_streambp.py."""
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, S, 2, 8, generator=gen) for _ in range(2))
    for fn in (local_attention, UlyssesAttention(None)):
        keys = fn.chunk_keys(k, v, DOCS, 0.5, 4)
        assert fn.can_stream and type(keys) is ChunkKeys
        assert keys.k_bshd is k and keys.v_bshd is v and keys.key_end(8, 16) == 16
        assert all(a is b for a, b in zip(keys.local_grads(k, v), (k, v)))
        q = torch.randn(B, 8, 4, 8, generator=gen)
        torch.testing.assert_close(keys.attend(q, 8, 16, k[:, :16], v[:, :16]),
                                   local_attention(torch.cat([torch.zeros(B, 8, 4, 8), q], 1), k[:, :16], v[:, :16],
                                                   doc_ids=DOCS[:, :16], scale=0.5)[:, 8:], rtol=1e-5, atol=1e-6)
    for fn in (RingAttention(None), UlyssesAttention(None, inner=RingAttention(None))):
        assert not fn.can_stream and fn.chunk_keys(k, v, DOCS, 0.5, 4) is None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""


def test_memory_and_kernels_keep_to_their_layers():
    """memory/ imports kernels and models only (no parallel, no DeepSpeed, no ZeRO attribute tests);
    kernels/ imports nothing else from longtrain."""
    for path in (REPO / "longtrain" / "memory").glob("*.py"):
        names = set(_imports(path))
        assert not {n for n in names if n.split(".")[0] == "deepspeed"}, path
        assert not {n for n in names if n.startswith(("longtrain.parallel", "longtrain.optim", "longtrain.trainer"))}, \
            (path, names)
        assert "ds_id" not in path.read_text(), path
    for path in (REPO / "longtrain" / "kernels").glob("*.py"):
        assert all(n.startswith("longtrain.kernels") for n in _imports(path) if n.startswith("longtrain")), path


@pytest.mark.parametrize("chunk", [8, 10**9])
def test_the_final_norm_is_recomputed_in_chunks(monkeypatch, chunk):
    """The final norm's backward runs on chunks of llama.NORM_CHUNK tokens: the same states and
    gradients, and under bf16 autocast (an unfused, fp32 norm) no op of its backward spans the whole
    sequence (with one chunk, the check sees its whole-sequence ops)."""
    import longtrain.models.llama as llama
    from longtrain.plan.tracker import StepTracker

    net = _model()
    ids, labels = _inputs(net)
    want_loss, want = _loss_and_grads(net, ids, labels)
    monkeypatch.setattr(llama, "NORM_CHUNK", chunk)
    got_loss, got = _loss_and_grads(net, ids, labels)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    assert all(torch.allclose(got[n], g, rtol=1e-10, atol=1e-14) for n, g in want.items())
    apply_streambp(net.float(), 13, offload=False)  # the layers' norms run on chunks of 13 tokens
    with StepTracker() as tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        net.hidden_states(ids, doc_ids=DOCS).float().square().sum().backward()
    # The norm's backward divides by the rms: a whole-sequence [B, S, hidden] div unless chunked.
    whole = [op for op, shape, _, _ in tracker.origin.values() if op == "div" and shape == (B, S, net.args.hidden_size)]
    assert bool(whole) == (chunk >= S), whole


def test_the_streamed_input_gradient_accumulates_in_the_input_dtype():
    """Under bf16 autocast StreamBP's dX accumulator is bf16 like the layer input (two additions per
    token), not a whole-sequence fp32 buffer; dK/dV accumulate in fp32 (exactness: the tests above)."""
    from longtrain.plan.tracker import StepTracker

    net = _model().float()
    ids, _ = _inputs(net)
    apply_streambp(net, 13, offload=False)
    with StepTracker() as tracker, torch.autocast("cpu", dtype=torch.bfloat16):
        net.hidden_states(ids, doc_ids=DOCS).float().square().sum().backward()
    hidden = (B, S, net.args.hidden_size)
    made = [(op, dtype) for op, shape, dtype, _ in tracker.origin.values() if op == "zeros_like" and shape == hidden]
    assert ("zeros_like", "bfloat16") in made and ("zeros_like", "float32") not in made, made
    kv = (B, S, net.args.num_kv_heads, net.args.head_dim)
    assert any(shape == kv and dtype == "float32" for _, shape, dtype, _ in tracker.origin.values())


def test_whole_sequence_keys_are_made_a_chunk_at_a_time_and_equal_the_whole():
    """StreamBP's whole-sequence K/V (and the two-pass path's Q/K/V) are made ``chunk`` tokens at a
    time, so the input norm's fp32 copies exist for one chunk only (Llama-3.1-8B over Ulysses 8 at
    2.9M tokens: 3 x 5.6 GiB whole); the same values as made whole."""
    from longtrain.memory.layer_parts import keys_values, whole_in_chunks

    net = _model()
    layer = net.layers[0]
    x = torch.randn(B, S, net.args.hidden_size, dtype=torch.float64)
    cos, sin = net.rope(torch.arange(S).expand(B, S), torch.float64)
    widths = []

    def parts_of(x_c, cos_c, sin_c):
        widths.append(x_c.shape[1])
        return keys_values(layer, x_c, cos_c, sin_c)

    with torch.no_grad():
        got = whole_in_chunks(parts_of, x, cos, sin, 16)
        want = keys_values(layer, x, cos, sin)
    assert widths == [16, 16, 8]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
