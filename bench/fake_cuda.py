"""Fake CUDA tensors that go through longtrain's CUDA code paths on a machine without a GPU.

Under ``FakeTensorMode`` a CUDA build of torch makes CUDA tensors with shapes, dtypes and strides
but no values, and runs CUDA's meta functions on them (flash and cuDNN attention, ``_grouped_mm``,
the fused RMSNorm). Four gaps stand between that and a training step; each has one tool here, a
context manager that undoes itself on exit:

* host reads: longtrain plans attention from index tensors on the host (``bool(...)``, ``.tolist()``,
  ``.to("cpu")``), which value-less tensors cannot answer. :class:`ShadowMode` keeps a real CPU value
  for every integer/bool tensor computable from known values; a value nothing can know (router
  counts from fake logits) comes from a fallback such as :func:`balanced_bincount`.
* backward: the C++ autograd engine fails on fake CUDA tensors before it runs a node
  (``hasPrimaryContext expects a valid device index``: its stream bookkeeping asks the driver).
  Under :func:`python_autograd` ``loss.backward()`` and ``torch.autograd.grad`` call the ``grad_fn``
  nodes from Python instead, in the engine's order.
* autocast: ``torch.autocast("cuda")`` turns itself off without a device (:func:`cuda_autocast_allowed`).
* streams: ``torch.cuda.Stream``/``Event``/``current_stream`` need a driver (:func:`stand_in_streams`).

Limits: floating values are never computed (no numerics, speed or memory); the Python engine has
no ``create_graph``, runs no hooks, reads ``torch._C._current_graph_task_id()`` as -1 and cannot run
reentrant checkpointing. Never patch ``torch.cuda.is_available`` to True before entering the fake
mode: the process then aborts in C++ (``CUDA driver version is insufficient``).
"""
from __future__ import annotations

import contextlib
import heapq
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.autograd.function import BackwardCFunction
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import GraphExecGroup

aten = torch.ops.aten


# ---------------------------------------------------------------------------- host values
class ShadowMode(TorchDispatchMode):
    """Real CPU values ("shadows", ``t._shadow``) for the integer/bool tensors of a fake-CUDA trace.

    An aten op whose tensor inputs are all integer/bool with known values (real, or shadowed), or an
    integer/bool factory, runs for real on the CPU; its result comes back real on the CPU, else as a
    fake tensor with a shadow. ``.item()``, ``bool()`` and ``.tolist()`` read the shadow. Other ops go
    to the fake mode; one that mutates its inputs drops their shadows. A shadowed CUDA tensor meeting
    a real CPU tensor of more than one element raises, as CUDA would. Enter it after the fake mode.

    Args:
        fake_mode: the active fake mode.
        fallbacks: ``{aten op: fn(*args, **kwargs) -> real CPU tensor}``: the made-up value of an op
            whose inputs have none (its result is shadowed with it).
    """

    def __init__(self, fake_mode: FakeTensorMode, fallbacks: Optional[Dict] = None):
        super().__init__()
        self.fake_mode, self.fallbacks = fake_mode, dict(fallbacks or {})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func is aten._local_scalar_dense.default and hasattr(args[0], "_shadow"):
            with unset_fake_temporarily():
                return args[0]._shadow.item()
        known = func.namespace == "aten" and all(hasattr(t, "_shadow") or not isinstance(t, FakeTensor)
                                                 for t in tensors)
        known = known and (self._makes_integers(func, args, kwargs) if not tensors else not any(
            t.dtype.is_floating_point or t.dtype.is_complex for t in tensors))
        if known:  # floating tensors (weights, activations) never get here
            return self._run_real(func, args, kwargs, tensors)
        if func in self.fallbacks:
            with unset_fake_temporarily():
                real = self.fallbacks[func](*args, **kwargs)
            return self._wrap(real, next((t.device for t in tensors), torch.device("cpu")))
        out = func(*args, **kwargs)
        if func._schema.is_mutable:
            for t in tensors:
                t.__dict__.pop("_shadow", None)
        return out

    @staticmethod
    def _makes_integers(func, args, kwargs) -> bool:
        """Whether a factory (an op without tensor inputs) makes an integer/bool tensor: asked of meta."""
        if "device" not in [a.name for a in func._schema.arguments]:
            return False
        with unset_fake_temporarily():
            probe = func(*args, **{**kwargs, "device": torch.device("meta")})
        return isinstance(probe, torch.Tensor) and not (probe.dtype.is_floating_point or probe.dtype.is_complex)

    def _wrap(self, real: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``real`` itself on the CPU, else a fake tensor on ``device`` shadowing it."""
        if device.type == "cpu":
            return real
        with unset_fake_temporarily():
            real = real.detach().cpu()
            fake = self.fake_mode.from_tensor(real)
        with self.fake_mode:
            fake = fake.to(device)
        fake._shadow = real
        return fake

    def _run_real(self, func, args, kwargs, tensors):
        devices = {t.device for t in tensors if isinstance(t, FakeTensor) or t.dim() > 0}
        if len(devices) > 1:  # 0-dim CPU tensors may meet CUDA ones, as on CUDA
            raise RuntimeError(f"Expected all tensors to be on the same device, but found "
                               f"{sorted(map(str, devices))} ({func})")
        target = kwargs.get("device")
        if target is None and func is aten._to_copy.default and len(args) > 1:
            target = args[1]
        target = torch.device(target if target is not None else next(iter(devices), "cpu"))
        real_args, real_kwargs = tree_map(lambda x: x._shadow if isinstance(x, FakeTensor) else torch.device("cpu")
                                          if isinstance(x, torch.device) else x, (args, kwargs))
        if "device" in real_kwargs:
            real_kwargs["device"] = torch.device("cpu")
        with unset_fake_temporarily():
            out = func(*real_args, **real_kwargs)
        mine = {id(t._shadow if isinstance(t, FakeTensor) else t): t for t in tensors}  # in place / out=
        return tree_map(lambda r: (mine[id(r)] if id(r) in mine else self._wrap(r, target))
                        if isinstance(r, torch.Tensor) else r, out)


def balanced_bincount(x: torch.Tensor, weights: Optional[torch.Tensor] = None, minlength: int = 0) -> torch.Tensor:
    """``torch.bincount`` of ids a fake trace cannot know (the router's choices), as the planner assumes.

    Args:
        x: the ids (only their number counts); weights: ignored; minlength: the number of bins.

    Returns:
        [max(minlength, 1)] int64 CPU counts, as equal as can be, summing to ``x.numel()``.
    """
    bins = max(int(minlength), 1)
    counts = torch.full((bins,), x.numel() // bins, dtype=torch.long)
    counts[: x.numel() % bins] += 1
    return counts


@contextlib.contextmanager
def fake_cuda(fallbacks: Optional[Dict] = None) -> Iterator[FakeTensorMode]:
    """Within the block CUDA tensors are fake and integer ones carry values (:class:`ShadowMode`).

    Args:
        fallbacks: :class:`ShadowMode`'s, e.g. ``{aten.bincount.default: balanced_bincount}``.

    Yields:
        The fake mode (``allow_non_fake_inputs``: real CPU tensors may enter ops, as index plans do).
    """
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, ShadowMode(mode, fallbacks):
        yield mode


# ---------------------------------------------------------------------------- backward
def _add(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else a if b is None else a + b


def _call(node, grads: List[Optional[torch.Tensor]]) -> tuple:
    """One node's output grads, one per ``node.next_functions`` edge (missing input grads as zeros)."""
    grads = [torch.zeros(tuple(m.shape), dtype=m.dtype, device=m.device) if g is None else g
             for m, g in zip(node._input_metadata, grads)]
    custom = isinstance(node, BackwardCFunction)  # a custom autograd.Function, else a C++ formula
    out = node.apply(*grads) if custom else node(*grads)
    out = out if isinstance(out, tuple) else (out,)
    if not custom:  # one grad per edge already
        return out
    # A custom Function returns one grad per forward input; the inputs that need one are exactly
    # its live edges, in order (the C++ engine pairs them by is_variable_input, hidden from Python).
    wanted = [i for i, need in enumerate(node.needs_input_grad) if need]
    live = [j for j, (fn, _) in enumerate(node.next_functions) if fn is not None]
    assert len(wanted) == len(live), (node.name(), wanted, live)
    mapped: List[Optional[torch.Tensor]] = [None] * len(node.next_functions)
    for i, j in zip(wanted, live):
        mapped[j] = out[i] if i < len(out) else None
    return tuple(mapped)


def _run(roots, root_grads, capture: Dict[tuple, int], accumulate: bool) -> List[Optional[torch.Tensor]]:
    """Back-propagate ``root_grads`` from the edges ``roots`` ((node, input_nr)) in the C++ engine's
    order (a node once all its consumers ran, the latest made first); returns the grads reaching the
    ``capture`` edges and, with ``accumulate``, adds the leaves' grads to their ``.grad``."""
    deps: Counter = Counter()
    seen, stack = set(), [n for n, _ in roots if n is not None]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            nexts = [nxt for nxt, _ in node.next_functions if nxt is not None]
            deps.update(nexts)
            stack += nexts
    buffers: Dict[object, List[Optional[torch.Tensor]]] = {}
    captured: List[Optional[torch.Tensor]] = [None] * len(capture)

    def feed(node, nr: int, g: torch.Tensor) -> None:
        meta = node._input_metadata[nr]  # as the engine's validate_outputs: undo broadcasts, cast
        g = g.sum_to_size(tuple(meta.shape)) if tuple(g.shape) != tuple(meta.shape) else g
        g = g.to(meta.dtype) if g.dtype != meta.dtype else g
        if (node, nr) in capture:
            captured[capture[(node, nr)]] = _add(captured[capture[(node, nr)]], g)
        buf = buffers.setdefault(node, [None] * len(node._input_metadata))
        buf[nr] = _add(buf[nr], g)

    for (node, nr), g in zip(roots, root_grads):
        if node is not None:
            feed(node, nr, g)
    ready = [(-n._sequence_nr(), id(n), n) for n in {n for n, _ in roots if n is not None} if not deps[n]]
    heapq.heapify(ready)
    # Non-reentrant checkpointing keys its recomputation on the graph task id, -1 outside the C++
    # engine: without a GraphExecGroup each unpacked tensor would recompute the region again. A
    # nested run (StreamBP's torch.autograd.grad inside a backward) stays in the outer group.
    nested = torch._C._get_graph_exec_group() is not None
    with torch.no_grad(), contextlib.nullcontext() if nested else GraphExecGroup():
        while ready:
            node = heapq.heappop(ready)[2]
            grads = buffers.pop(node, [])
            if node.name() == "torch::autograd::AccumulateGrad":  # a leaf (its hooks are not run)
                var, g = node.variable, grads[0]
                if accumulate and g is not None:
                    var.grad = g.detach() if var.grad is None else var.grad + g
                continue
            live = any(g is not None for g in grads)  # nothing flows in: nothing flows out
            outs = _call(node, grads) if live else [None] * len(node.next_functions)
            for (nxt, nr), g in zip(node.next_functions, outs):
                if nxt is not None:
                    if g is not None:
                        feed(nxt, nr, g)
                    deps[nxt] -= 1
                    if deps[nxt] == 0:
                        heapq.heappush(ready, (-nxt._sequence_nr(), id(nxt), nxt))
    return captured


def _edge(t: torch.Tensor) -> tuple:
    if t.grad_fn is not None:
        return t.grad_fn, t.output_nr
    if not t.requires_grad:
        raise RuntimeError("element does not require grad and does not have a grad_fn")
    edge = torch.autograd.graph.get_gradient_edge(t)  # a leaf: its AccumulateGrad node
    return edge.node, edge.output_nr


def _listed(x) -> list:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _seeds(tensors: List[torch.Tensor], grads) -> List[torch.Tensor]:
    """The output gradients to start from: ``grads``, or ones for scalar outputs."""
    grads = [None] * len(tensors) if grads is None else _listed(grads)
    if any(g is None and t.numel() != 1 for t, g in zip(tensors, grads)):
        raise RuntimeError("grad can be implicitly created only for scalar outputs")
    return [torch.ones_like(t) if g is None else g for t, g in zip(tensors, grads)]


def _python_grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, only_inputs=True,
                 allow_unused=None, is_grads_batched=False, materialize_grads=False) -> tuple:
    """``torch.autograd.grad`` on :func:`_run` (``retain_graph`` is moot: nothing is freed)."""
    assert not create_graph and not is_grads_batched, "the Python engine has no create_graph or batched grads"
    outputs, inputs = _listed(outputs), _listed(inputs)
    capture = {_edge(t): i for i, t in enumerate(inputs)}
    got = _run([_edge(t) for t in outputs], _seeds(outputs, grad_outputs), capture, accumulate=False)
    if not (allow_unused or materialize_grads) and any(g is None for g in got):
        raise RuntimeError("One of the differentiated Tensors appears to not have been used in the graph.")
    return tuple(torch.zeros_like(i) if g is None and materialize_grads else g for g, i in zip(got, inputs))


def _python_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
                     inputs=None) -> None:
    """``torch.autograd.backward`` on :func:`_run`: adds the gradients to the leaves' ``.grad``."""
    assert not create_graph and inputs is None, "the Python engine has no create_graph or inputs="
    tensors = _listed(tensors)
    _run([_edge(t) for t in tensors], _seeds(tensors, grad_tensors), {}, accumulate=True)


@contextlib.contextmanager
def _swapped(owner, **values) -> Iterator[None]:
    """``owner.<name> = value`` for each keyword within the block; the originals come back on exit."""
    saved = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


@contextlib.contextmanager
def python_autograd() -> Iterator[None]:
    """Within the block ``torch.autograd.backward``/``grad`` and ``Tensor.backward`` run the Python
    engine (module docstring), so ``loss.backward()`` and the ``torch.autograd.grad`` calls inside
    custom backwards (StreamBP) work on fake CUDA tensors. They refuse ``create_graph``, ``inputs=``
    and batched grads."""
    def tensor_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        _python_backward(self, gradient, retain_graph, create_graph, inputs=inputs)

    with _swapped(torch.autograd, grad=_python_grad, backward=_python_backward), \
            _swapped(torch.Tensor, backward=tensor_backward):
        yield


# ---------------------------------------------------------------------------- autocast, streams
@contextlib.contextmanager
def cuda_autocast_allowed() -> Iterator[None]:
    """Within the block ``torch.autocast("cuda", dtype=torch.bfloat16)`` applies CUDA's autocast policy
    (the dispatcher's own); outside, it warns and turns itself off on a machine without a device.

    ``torch.autocast.__init__`` asks ``amp_definitely_not_available()`` (no device: off) and
    ``is_bf16_supported()`` (needs a driver): only these two are answered; ``torch.cuda.is_available()``
    stays False. Keep the block around the backward: checkpointing re-enters autocast to recompute.
    """
    with _swapped(torch.cuda.amp.common, amp_definitely_not_available=lambda: False), \
            _swapped(torch.cuda, is_bf16_supported=lambda including_emulation=True: True):
        yield


@contextlib.contextmanager
def stand_in_streams() -> Iterator[Counter]:
    """Within the block ``torch.cuda.Stream``, ``Event``, ``current_stream``, ``stream`` and
    ``Tensor.record_stream`` (each needs a driver) are stand-ins that only count their calls. Fake
    tensors have no timeline: the code's stream ordering is not checked, only that it runs. Objects
    the code caches (a side stream) must not be used after the block.

    Yields:
        The calls by name (``Stream()``, ``stream.wait_stream``, ``event.record``, ...).
    """
    calls: Counter = Counter()

    def counted(name: str, result=None) -> Callable:
        def stand_in(*args, **kwargs):
            calls[name] += 1
            return result
        return stand_in

    class Stream:  # wait_stream, wait_event, record, synchronize, ...: counted under the class's name
        def __init__(self, *args, **kwargs):
            calls[f"{type(self).__name__}()"] += 1

        def __getattr__(self, name: str) -> Callable:
            return counted(f"{type(self).__name__.lower()}.{name}")

    class Event(Stream):
        pass

    default = object.__new__(Stream)  # the current stream, made without counting a Stream()
    with _swapped(torch.cuda, Stream=Stream, Event=Event, current_stream=counted("current_stream", default),
                  stream=counted("stream(...)", contextlib.nullcontext())), \
            _swapped(torch.Tensor, record_stream=counted("record_stream")):
        yield calls
