"""The dispatch mode the planner runs a training step under: live storage bytes, FLOPs and a
roofline time, op by op.

:class:`StepTracker` sees every aten op of the step (``TorchDispatchMode``). For each op it

- records the storages of the outputs it has not seen yet and drops them again when their
  storage object dies (a ``weakref.finalize`` on the storage), so :attr:`live` is the bytes of
  tensor storage alive at any moment and :attr:`peak` its maximum; the same code runs on real
  and on fake tensors, which is what makes the plan checkable against a real step;
- counts FLOPs with :data:`torch.utils.flop_counter.flop_registry` (matmuls, SDPA) plus the CPU
  flash-attention ops the registry lacks; causal attention (``is_causal`` with square scores)
  counts half the score matrix, as the kernels skip the masked blocks; the flash varlen ops
  (``aten._flash_attention_forward`` / ``_backward``) count the visible (query, key) pairs of
  every sequence;
- adds a roofline time ``max(flops / peak_flops, bytes / bandwidth)`` at the datasheet peak with
  ``bytes`` the tensors the op reads and writes (views move nothing), and, given a
  :class:`~longtrain.plan.clock.Clock`, the op's time at the rates kernels reach to
  :attr:`StepTracker.timeline`: an op touching host memory (storages :meth:`StepTracker.mark_host`
  named) is a host copy, or host work when it touches nothing else;
- with a GPU target, adds the workspace flash attention's backward allocates inside the op on
  CUDA (:func:`~longtrain.plan.flops.flash_backward_workspace`) to the live bytes while the op runs;
- remembers which op made each storage (:attr:`StepTracker.origin`), which storages a collective
  read or wrote, and which the step's engine names as its buffers (:attr:`StepTracker.buffer_probe`),
  so a plan can say what is alive at its peak.

Collectives (``c10d`` ops) are recorded as :class:`~longtrain.plan.comm.Collective` with the bytes
this rank sends (:attr:`StepTracker.collectives`).

Under :class:`~torch._subclasses.fake_tensor.FakeTensorMode` (``fake=True``) it also routes the
small integer bookkeeping of the step (token indices, masks derived from them, the batch) to real
kernels: an op none of whose tensor arguments is fake, and an integer or boolean factory, runs for
real, so data-dependent decisions on indices (the block kernels' causal windows) are taken as in
training. A scalar read of a fake floating tensor (a loss, a gradient norm) answers 1.0; one of a
fake boolean or uint8 tensor (a flag computed from float values: an engine's inf/nan or overflow
check) answers False / 0, as in a steady state; one of any other fake integer (a decision the
planner cannot follow) raises. In a fake process
world (:func:`~longtrain.plan.world.fake_world`) collectives move nothing, so a real (integer)
tensor that a collective fills is filled as if every rank held what this rank holds: an all-gather
repeats the input, an all-to-all returns it, a receive gets the tensor this rank last sent of the
same shape and dtype (a ring's zigzag index blocks then visit this rank's own indices on every hop,
which for the load-balanced zigzag layout is the same causal work per rank in total). A
``bincount`` of fake expert ids (Mixture-of-Experts routing) answers perfectly balanced counts.
"""
from __future__ import annotations

import bisect
import itertools
import weakref
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

from longtrain.plan.clock import Clock, Timeline
from longtrain.plan.comm import Collective, collective_of
from longtrain.plan.flops import op_flops, workspace_bytes

aten = torch.ops.aten
_DEVICE = torch.ops.prim.device.default
_METADATA_OPS = frozenset((_DEVICE, torch.ops.prim.layout.default))
"""Ops that only read a tensor's metadata (``t.device``, which Python code and the autograd engine ask
of every tensor: half the ops a plan dispatches): they allocate, read and write nothing, so the
tracker answers them without its per-op bookkeeping."""


WORKSPACE = 0
"""The serial of an op's internal workspace in :attr:`StepTracker.peak_snapshot` (storages start at 1)."""

def _tensors(tree, out: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """The tensors of an op's arguments or outputs (tuples, lists and dicts of them, the only
    containers an aten op takes or returns), in order: a fifth of a long plan's time went to the
    generic ``tree_flatten`` here."""
    out = [] if out is None else out
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            _tensors(x, out)
    elif isinstance(tree, dict):
        for x in tree.values():
            _tensors(x, out)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage (the same for every view of it)."""
    return id(t.untyped_storage())


START_KEY = "step:start"
"""The key of :attr:`StepTracker.peak_by_key` that holds the bytes alive when the step starts."""


class StepTracker(TorchDispatchMode):
    """Live tensor-storage bytes, FLOPs and roofline time of every op run under it (module docstring).

    Args:
        peak_flops: FLOP/s of the target device (0: no roofline).
        bandwidth: memory bytes/s of the target device.
        fake: the step runs under a ``FakeTensorMode`` entered before this mode.
        clock: times every op at the target's achieved rates into :attr:`timeline` (None: no clock).
    """

    def __init__(self, peak_flops: float = 0.0, bandwidth: float = 0.0, fake: bool = False,
                 clock: Optional[Clock] = None) -> None:
        super().__init__()
        self.peak_flops, self.bandwidth, self.fake, self.clock = peak_flops, bandwidth, fake, clock
        self.timeline = Timeline()
        """The clock's seconds of the step per category (with a clock)."""
        self.live = 0
        """Device bytes alive now (host copies of an offload plan excluded)."""
        self.peak = 0
        self.host_live = 0
        self.host_peak = 0
        self.pinned_live = self.pinned_peak = 0  # the page-locked part of the host bytes
        self._pinned: Set[int] = set()
        self.flops = 0
        self.time_s = self.compute_s = self.memory_s = 0.0
        self.phase = "setup"
        """What the step is doing (set by the caller): the phase of the peak is reported."""
        self.peak_phase = "setup"
        self._clock = 0  # counts the storage events (made, freed, moved to the host)
        self._born: Dict[int, int] = {}  # serial -> event it was made at
        self._died: Dict[int, int] = {}  # serial -> event it was freed at
        self._hosted: Dict[int, int] = {}  # serial -> event it became host memory at
        self._peak_at, self._peak_workspace = 0, 0  # the event of the peak, and an op's workspace then
        self.allocations: List[Tuple[int, int]] = []
        """(serial, bytes) of every storage in the order it appeared."""
        self._live: Dict[int, Tuple[int, int, str]] = {}  # id(storage) -> (serial, bytes, where)
        self._serial = 0
        self.collectives: List[Collective] = []
        """Every collective of the step, in order."""
        self._sent: List[torch.Tensor] = []  # real tensors sent in a fake world, for the echo
        self.workspace_peak = 0
        """The largest internal workspace of an op (CUDA attention backward)."""
        self._sizes: Dict[int, int] = {}  # serial -> bytes of every storage ever counted
        self.origin: Dict[int, Tuple[str, tuple, str, str]] = {}
        """serial -> (op that made it, shape, dtype, phase) of every storage counted."""
        self._op = "setup"
        self.step_start = 0
        """Serial of the last storage made before :meth:`start_step`."""
        self.comm_serials: Set[int] = set()
        """Storages a collective read or wrote (communication buffers)."""
        self.buffer_probe: Callable[[], List[torch.Tensor]] = list
        """Asked before every op for the working buffers of the step's engine (set by the caller)."""
        self.buffer_serials: Set[int] = set()
        """Serials of every storage :attr:`buffer_probe` answered."""
        self.peak_by_key: Dict[str, int] = {}
        """``"phase:op"`` -> the most device bytes alive when that op of that phase ran: every local
        peak of the step, by where it happens (the planner extends each to a deeper model apart)."""
        self._key_at: Dict[str, Tuple[int, int]] = {}
        """Key of :attr:`peak_by_key` -> (event count, op workspace) when its local peak happened."""

    def start_step(self) -> None:
        """Start measuring the step proper: what is alive now (model, optimizer and engine state
        after the warm-up step) stays counted; the peak, FLOPs, time and collectives restart."""
        self.peak, self.peak_phase = self.live, self.phase
        self.peak_by_key = {START_KEY: self.live}
        self._key_at = {START_KEY: (self._clock, 0)}
        self.host_peak = self.host_live
        self.pinned_peak = self.pinned_live
        self._snapshot()
        self.allocations = []
        self.workspace_peak = 0
        self.flops, self.time_s, self.compute_s, self.memory_s = 0, 0.0, 0.0, 0.0
        self.timeline = Timeline()
        self.collectives = []
        self.step_start = self._serial

    @property
    def serial(self) -> int:
        """Serial of the latest storage counted (later ones have larger serials)."""
        return self._serial

    def size_of(self, serial: int) -> int:
        """Bytes of the storage ``serial``."""
        return self._sizes[serial]

    def alive(self) -> Set[int]:
        """Serials of every storage alive in device memory now (host copies of an offload excluded)."""
        return {serial for serial, _, where in self._live.values() if where == "device"}

    # -------------------------------------------------------------- storage bookkeeping
    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage as live device memory until it dies (nothing when counted already)."""
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        size = st.nbytes()
        self._serial += 1
        self._live[key] = (self._serial, size, "device")
        self._sizes[self._serial] = size
        self.origin[self._serial] = (self._op, tuple(t.shape), str(t.dtype).replace("torch.", ""), self.phase)
        self.allocations.append((self._serial, size))
        self.live += size
        self._clock += 1
        self._born[self._serial] = self._clock
        weakref.finalize(st, self._free, key, self._serial)
        self._at_key(self.live)
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase
            self._snapshot()

    def _at_key(self, live: int, op: Optional[str] = None, workspace: int = 0) -> None:
        key = f"{self.phase}:{op or self._op}"
        if live > self.peak_by_key.get(key, -1):
            self.peak_by_key[key] = live
            self._key_at[key] = (self._clock, workspace)

    def bytes_at_keys(self, kind_of: Callable[[int], str]) -> Dict[str, Dict[str, int]]:
        """Device bytes alive at each local peak of :attr:`peak_by_key`, by ``kind_of(serial)`` (an
        op's workspace: ``kind_of(WORKSPACE)``), exact: rebuilt from the events at once for every key
        (a storage is alive on the device from its birth until it dies or moves to the host)."""
        keys = [k for k in self.peak_by_key if k in self._key_at]
        times = sorted({self._key_at[k][0] for k in keys})
        if not times:
            return {}
        deltas: Dict[str, List[int]] = {}
        for serial, born in self._born.items():
            end = min(self._died.get(serial, times[-1] + 1), self._hosted.get(serial, times[-1] + 1))
            first, last = bisect.bisect_left(times, born), bisect.bisect_left(times, end)
            if first < last:  # alive at times[first:last]
                row = deltas.setdefault(kind_of(serial), [0] * (len(times) + 1))
                row[first] += self._sizes[serial]
                row[last] -= self._sizes[serial]
        alive = {kind: list(itertools.accumulate(row)) for kind, row in deltas.items()}
        place = {t: i for i, t in enumerate(times)}
        out = {}
        for key in keys:
            t, workspace = self._key_at[key]
            out[key] = {kind: alive[kind][place[t]] for kind in alive}
            if workspace:
                kind = kind_of(WORKSPACE)
                out[key][kind] = out[key].get(kind, 0) + workspace
        return out

    def _snapshot(self, workspace: int = 0) -> None:
        """The peak is now: remember the event (the storages alive then are found from the events)."""
        self._peak_at, self._peak_workspace = self._clock, workspace

    @property
    def peak_snapshot(self) -> Dict[int, Tuple[int, str]]:
        """serial -> (bytes, "device" | "host") of every storage alive at the peak (:data:`WORKSPACE`:
        an op's internal workspace, when the peak was inside one), exact: rebuilt from the events."""
        t = self._peak_at
        out = {serial: (self._sizes[serial], "host" if self._hosted.get(serial, t + 1) <= t else "device")
               for serial, born in self._born.items() if born <= t and self._died.get(serial, t + 1) > t}
        if self._peak_workspace:
            out[WORKSPACE] = (self._peak_workspace, "device")
        return out

    def mark_host(self, t: torch.Tensor, pinned: bool = True) -> None:
        """Count ``t``'s storage as host memory (an offloaded copy), not device memory; ``pinned``:
        page-locked (copies to and from the device), else pageable (a host optimizer's state)."""
        self.track(t)
        key = id(t.untyped_storage())
        serial, size, where = self._live[key]
        if where == "device":
            self._clock += 1
            self._hosted[serial] = self._clock
            self._live[key] = (serial, size, "host")
            self.live -= size
            self.host_live += size
            self.host_peak = max(self.host_peak, self.host_live)
            if pinned:
                self._pinned.add(serial)
                self.pinned_live += size
                self.pinned_peak = max(self.pinned_peak, self.pinned_live)

    def host_optimizer_step(self, state_bytes: int) -> None:
        """A host optimizer stepped ``state_bytes`` of fp32 state (ZeRO-Offload's CPU AdamW, whose
        arithmetic a plan skips): the clock adds its time."""
        if self.clock is not None:
            self.timeline.host(self.clock.host_optimizer_seconds(state_bytes))

    def _on_host(self, t: torch.Tensor) -> bool:
        entry = self._live.get(storage_key(t))
        return entry is not None and entry[2] == "host"

    def _clock_op(self, func, args, ins: List[torch.Tensor], outs: List[torch.Tensor], flops: int, moved: int) -> None:
        """Time one op on the clock (module docstring): device work, a host copy or host work."""
        out_keys = {storage_key(t) for t in outs}
        read = [t for t in ins if storage_key(t) not in out_keys]
        host_written = sum(_nbytes(t) for t in outs if self._on_host(t))
        host_read = sum(_nbytes(t) for t in read if self._on_host(t))
        device = any(not self._on_host(t) for t in read + outs)
        if not host_written and not host_read:
            category, seconds = self.clock.op_seconds(func, args, flops, moved)
            self.timeline.device(self.phase, category, seconds)
        elif not device:
            self.timeline.host(self.clock.host_seconds(moved))
        elif host_written:
            self.timeline.copy(self.phase, True, self.clock.copy_seconds(host_written))
        else:
            self.timeline.copy(self.phase, False, self.clock.copy_seconds(host_read))

    def _free(self, key: int, serial: int) -> None:
        entry = self._live.get(key)
        if entry is None or entry[0] != serial:
            return
        del self._live[key]
        self._clock += 1
        self._died[serial] = self._clock
        if serial in self._pinned:
            self.pinned_live -= entry[1]
        if entry[2] == "host":
            self.host_live -= entry[1]
        else:
            self.live -= entry[1]

    def live_bytes(self, device_type: Optional[str] = None) -> int:
        """Device bytes alive now."""
        return self.live

    def serials(self, tensors) -> Set[int]:
        """Serials of the live storages of ``tensors`` (None entries skipped)."""
        out = set()
        for t in tensors:
            if t is not None and id(t.untyped_storage()) in self._live:
                out.add(self._live[id(t.untyped_storage())][0])
        return out

    serials_of_storages = serials

    # -------------------------------------------------------------- dispatch
    def _run_real(self, func, args, kwargs, tensors: List[torch.Tensor]) -> bool:
        if any(isinstance(t, FakeTensor) for t in tensors):
            return False
        if tensors:
            return True
        # A factory: real when it makes integers or booleans (asked of the meta device, for the
        # dtype torch infers, e.g. arange over ints).
        with unset_fake_temporarily():
            probe = func(*args, **{**kwargs, "device": torch.device("meta")}) if "device" in [
                a.name for a in func._schema.arguments] else None
        return isinstance(probe, torch.Tensor) and not (probe.dtype.is_floating_point or probe.dtype.is_complex)

    @staticmethod
    def _balanced_bincount(ids: torch.Tensor, minlength: int) -> torch.Tensor:
        """Counts of ``ids.numel()`` ids spread evenly over ``minlength`` bins (a real tensor)."""
        n, bins = ids.numel(), max(int(minlength), 1)
        with unset_fake_temporarily():
            counts = torch.full((bins,), n // bins, dtype=torch.long)
            counts[: n % bins] += 1
        return counts

    def _echo(self, func, args) -> None:
        """Fill the real tensors a no-op collective of a fake world left unfilled (module docstring)."""
        def real(t):
            return isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)

        name = func._opname
        with unset_fake_temporarily():
            if name == "send":
                self._sent.extend(t for t in args[0] if real(t))
            elif name == "recv_":
                for t in args[0]:
                    i = next((i for i, s in enumerate(self._sent) if s.shape == t.shape and s.dtype == t.dtype), None)
                    if real(t) and i is not None:
                        t.copy_(self._sent.pop(i))
            elif name == "allgather_":
                for outs, x in zip(args[0], args[1]):
                    for o in outs:
                        if real(o) and real(x):
                            o.copy_(x)
            elif name == "_allgather_base_" and real(args[0]) and real(args[1]):
                args[0].view(-1, *args[1].shape).copy_(args[1])
            elif name == "alltoall_base_" and real(args[0]) and real(args[1]):
                args[0].copy_(args[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA_OPS:  # a tensor's device or layout: no storage, no work
            if func is _DEVICE and isinstance(args[0], FakeTensor):  # FakeTensorMode's own answer, without its dispatch
                return torch.device("meta") if args[0].fake_mode.in_kernel_invocation else args[0].fake_device
            return func(*args, **kwargs)
        self.buffer_serials |= self.serials(self.buffer_probe())
        if self.fake and func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            if args[0].dtype in (torch.bool, torch.uint8):  # a flag on float values (inf/nan, overflow)
                return False if args[0].dtype == torch.bool else 0  # a steady state raises none
            if not args[0].dtype.is_floating_point:
                raise RuntimeError(f"a decision on the value of a fake {args[0].dtype} tensor of shape "
                                   f"{tuple(args[0].shape)}: the planner cannot follow it")
            return 1.0  # a loss or a gradient norm read by the step: finite
        if self.fake and func is aten.bincount.default and isinstance(args[0], FakeTensor):
            return self._balanced_bincount(args[0], kwargs.get("minlength", args[2] if len(args) > 2 else 0))
        ins = _tensors((args, kwargs))
        if self.fake and self._run_real(func, args, kwargs, ins):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        outs = _tensors(out)
        in_keys = {storage_key(t) for t in ins}
        moved = 0
        for t in outs:
            if storage_key(t) not in in_keys or func._schema.is_mutable:
                moved += _nbytes(t)
        if moved:  # not a view: the op reads its inputs and writes its outputs
            moved += sum(_nbytes(t) for t in ins)
        if func.namespace in ("c10d", "_c10d_functional"):
            self.comm_serials |= self.serials(ins)
            found = collective_of(func, args, self.phase)
            if found is not None:
                self.collectives.append(found)
            if self.fake:
                self._echo(func, args)
        flops = op_flops(func, args, kwargs, out)
        self.flops += flops
        if self.peak_flops:
            c, m = flops / self.peak_flops, moved / self.bandwidth
            self.compute_s += c
            self.memory_s += m
            self.time_s += max(c, m)
        if self.clock is not None and (flops or moved) and func.namespace not in ("c10d", "_c10d_functional"):
            self._clock_op(func, args, ins, outs, flops, moved)  # (collectives: their link time, comm.py)
        self._op = func._opname
        for t in outs:
            self.track(t)
        self._op = "tracked"
        if func.namespace in ("c10d", "_c10d_functional"):
            self.comm_serials |= self.serials(outs)
        if self.peak_flops:
            self._transient(workspace_bytes(func, args), func._opname)
        return out

    def _transient(self, nbytes: int, op: str = "workspace") -> None:
        """A workspace of ``nbytes`` an op allocates and frees inside itself, alive with its outputs."""
        self.workspace_peak = max(self.workspace_peak, nbytes)
        if nbytes:
            self._at_key(self.live + nbytes, op, nbytes)
        if nbytes and self.live + nbytes > self.peak:
            self.live += nbytes
            self.peak, self.peak_phase = self.live, self.phase
            self._snapshot(workspace=nbytes)
            self.live -= nbytes
