"""The composition matrix: layout x ZeRO stage x StreamBP x dense/MoE x accumulation, each cell
against one process on the same global batch (gloo, CPU, fp32). See docs/COMPOSITION.md.

Axes:

- layout ``1``, ``u2``, ``r2`` (2 ranks), ``u2xr2``, ``dp2xu2``, ``dp2xr2`` (4 ranks);
- ``zero.stage`` 0 (plain data parallelism), 1, 2, 3;
- StreamBP off, or on with chunks of 48 tokens (dividing neither the 256-token sequences nor the
  128- and 64-token shards);
- the dense tiny model, or the tiny MoE model with global-batch load balancing (coefficient 0.1
  and a router z-loss 0.01, large enough that a wrong count, scale or scope moves the router's
  gradient far past the tolerance);
- ``trainer.grad_accum`` 1 or 2 with the same global batch of 4 sequences.

Every cell trains on the packed passkey documents (boundaries fall anywhere, so inside shards,
ring blocks and StreamBP chunks) with grouped-query attention: 4 query heads over 2 KV heads on 1
and 2 ranks, over 1 KV head on 4 ranks, where the Ulysses degree 2 exceeds the KV heads (each KV
head is replicated) for ``u2xr2`` and ``dp2xu2``.

The reference of a cell is one process, ZeRO off, StreamBP off, with the same model, the same
number of accumulation micro-batches and micro-batches of ``4 / grad_accum`` sequences: rank r's
micro-batch j is block ``j * dp + r`` of the global rows (GlobalBatchSampler), so the reference's
micro-batch j is exactly the union of every rank's micro-batch j. That matters for MoE global
balancing, whose running totals over the step's micro-batches (docs/MOE.md) make the balancing
loss depend on how the batch is split into micro-batches; the cross-entropy and dense gradients
do not depend on it (global-count normalisation).

Checks per cell (tolerances: support/parity.py's error model): the first step's loss (1e-5
relative) and the full gradient of every parameter (gathered from the ZeRO shards) within rtol 1e-4,
atol 1e-6; then the loss, gradient norm and learning rate of 4 steps (and for MoE the balancing
metrics) within 1e-5 relative at step 1 and 1e-4 at steps 2-4, where AdamW amplifies the reordering.
Only the summation order differs between a cell and its reference (split reductions, DeepSpeed's
flat buckets, blockwise softmax merges, per-chunk weight gradients), ~1e-7 relative per op: measured
on six cells covering every layout, stage, model and accumulation, losses differ by at most 1.2e-7
and gradient norms by 1.1e-6 relative, and gradient entries by at most 9e-8 absolute. That absolute
error is a few fp32 ulps of the larger entries, so entries near 0 (per-tensor medians of |g| go down
to 2e-5, single entries much lower) differ by up to 1e-3 relative: hence the atol. 1e-6 is 10x the
observed absolute differences and 20x below the smallest per-tensor median, so a wrong scale (x2,
/dp, /accum), a lost shard edge or chunk, or a wrong balancing scope still fails at step 1.

Every cell trains: none is refused (StreamBP with ZeRO-3 under ring and hybrid layouts, refused
before, streams all but the attention core: longtrain/memory/two_pass.py).

The default run takes a slice (every layout, every stage, StreamBP on and off, dense and MoE,
accumulation 1 and 2, and StreamBP + ZeRO-3 under the ring); ``-m slow`` runs the other cells and ``-m "not gpu"``
all of them. The cells selected in a session run grouped by world size (test_zero.py's job
runner: the cells of a group one after the other in the same ranks, at most GROUP_CELLS per
group), each reference once per module, in the first single-process group.
"""
from __future__ import annotations

import itertools

import pytest

from support.helpers import SMALL
from support.harness import run_jobs
from support.parity import STEP1_RTOL, assert_same_curve, assert_same_step1, assert_scalar

LAYOUTS = {"1": (1, 1, 1), "u2": (2, 2, 1), "r2": (2, 1, 2),  # name: (world, ulysses, ring)
           "u2xr2": (4, 2, 2), "dp2xu2": (4, 2, 1), "dp2xr2": (4, 1, 2)}
STAGES = (0, 1, 2, 3)
SBP = {"plain": [], "sbp": ["memory.streambp.enabled=true", "memory.streambp.chunk_size=48"]}
MODELS = {"dense": [], "moe": ["model.name=tiny_moe", "moe.balance.scope=global", "moe.balance.coef=0.1",
                               "moe.z_loss_coef=0.01", "logging.expert_frac_every=1"]}
ACCUM = (1, 2)
GLOBAL_BATCH = 4
STEPS = 4
CURVE_KEYS = ("loss", "grad_norm", "lr")
MOE_KEYS = ("aux_loss", "moe/lbl", "moe/z_loss", "moe/maxvio")


def kv_heads(world: int) -> int:
    """2 KV heads on 1 and 2 ranks (Hkv divisible by the Ulysses degree), 1 on 4 ranks (fewer KV
    heads than the Ulysses degree: replicated)."""
    return 1 if world == 4 else 2


# The default slice: every layout, every stage, StreamBP on and off, dense and MoE, accumulation 1
# and 2, on each world size; and StreamBP with ZeRO-3 under the ring. The rest is slow.
DEFAULT = {
    ("1", 1, "sbp", "moe", 2), ("1", 3, "plain", "dense", 1),
    ("u2", 2, "sbp", "dense", 1), ("r2", 3, "plain", "moe", 2),
    ("u2xr2", 0, "sbp", "moe", 1), ("dp2xu2", 3, "sbp", "dense", 2), ("dp2xr2", 2, "plain", "moe", 2),
    ("r2", 3, "sbp", "moe", 2),
}


def cell_id(cell) -> str:
    layout, stage, sbp, model, accum = cell
    return f"{layout}-z{stage}-{sbp}-{model}-a{accum}"


def _is_reference(cell) -> bool:
    layout, stage, sbp, _, _ = cell
    return layout == "1" and stage == 0 and sbp == "plain"


CELLS = [c for c in itertools.product(LAYOUTS, STAGES, SBP, MODELS, ACCUM) if not _is_reference(c)]
PARITY = {("u2", 2, "sbp", "dense", 1), ("r2", 3, "plain", "moe", 2)}
"""Cells of the parity slice .ci/run repeats under ATEN_CPU_CAPABILITY=default (two-rank, fast)."""
PARAMS = [pytest.param(*c, id=cell_id(c), marks=(pytest.mark.parity,) if c in PARITY else ()
                       if c in DEFAULT else pytest.mark.slow)
          for c in CELLS]


def overrides(tmp, name, layout, stage, sbp, model, accum):
    world, ulysses, ring = LAYOUTS[layout]
    dp = world // (ulysses * ring)
    return SMALL + MODELS[model] + SBP[sbp] + [
        "model.num_heads=4", f"model.num_kv_heads={kv_heads(world)}", f"run.dir={tmp / name}",
        f"data.cache_dir={tmp / 'cache'}", f"trainer.max_steps={STEPS}", "checkpoint.save_final=false",
        f"data.global_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size={GLOBAL_BATCH // (dp * accum)}",
        f"trainer.grad_accum={accum}", f"zero.stage={stage}", f"parallel.sp.ulysses={ulysses}",
        f"parallel.sp.ring={ring}"]


def reference_key(layout, model, accum):
    return model, accum, kv_heads(LAYOUTS[layout][0])


def _selected_cells(session):
    """The cells of this module that this session runs (after -m / -k deselection)."""
    cells = []
    for item in session.items:
        spec = getattr(item, "callspec", None)
        if item.module.__name__ == __name__ and spec is not None and item.originalname == "test_cell":
            p = spec.params
            cells.append((p["layout"], p["stage"], p["sbp"], p["model"], p["accum"]))
    return cells


# The references the negative control (test_the_reference_must_split_like_the_cell) compares.
CONTROL_REFS = [("dense", 1, 1), ("dense", 2, 1), ("moe", 1, 1), ("moe", 2, 1)]
GROUP_CELLS = 32  # cells per process group at most: a group runs in one test's time (pytest --timeout)


def _reference_job(tmp, key):
    model, accum, kv = key
    layout = "1" if kv == 2 else "u2xr2"  # only the KV-head count is taken from the layout
    ov = overrides(tmp, f"ref-{model}-a{accum}-kv{kv}", layout, 0, "plain", model, accum)
    return str(key), ov + ["parallel.sp.ulysses=1", "parallel.sp.ring=1"], {"grads": True}


@pytest.fixture(scope="module")
def matrix(request, tmp_path_factory):
    """Runs what this session's cells need, lazily, in few process groups: the cells that train,
    grouped by world size in chunks of at most GROUP_CELLS, each chunk one process group running
    its cells one after the other (test_zero.py's job runner); every reference once, in the first
    world-1 group. A group that fails fails each of its cells with its error (it is not rerun)."""
    tmp = tmp_path_factory.mktemp("matrix")
    cells = _selected_cells(request.session)
    groups, runs = {}, {}
    for world in sorted({LAYOUTS[c[0]][0] for c in cells} | {1}):
        mine = [c for c in cells if LAYOUTS[c[0]][0] == world]
        for i in range(0, max(len(mine), 1), GROUP_CELLS):
            jobs = [(cell_id(c), overrides(tmp, cell_id(c), *c), {"grads": True}) for c in mine[i:i + GROUP_CELLS]]
            if world == 1 and i == 0:
                keys = sorted({reference_key(c[0], c[3], c[4]) for c in cells} | set(CONTROL_REFS))
                jobs = [_reference_job(tmp, k) for k in keys] + jobs
            name = f"world{world}-{i // GROUP_CELLS}"
            groups[name] = (world, jobs)
            runs.update({job[0]: name for job in jobs})

    def result(job):
        name = runs[job]
        if not isinstance(groups[name], dict):
            world, jobs = groups[name]
            try:
                groups[name] = run_jobs(world, jobs)
            except Exception as e:  # noqa: BLE001 - handed to every cell of the group
                groups[name] = {"error": e}
        if "error" in groups[name]:
            raise RuntimeError(f"process group {name} failed: {groups[name]['error']}") from groups[name]["error"]
        return groups[name][job]

    return lambda key: result(str(key)), lambda cell: result(cell_id(cell))


def assert_matches(got, ref, moe):
    assert_same_step1(got, ref)
    assert [m["step"] for m in ref["metrics"]] == list(range(1, STEPS + 1))
    assert_same_curve(got["metrics"], ref["metrics"], keys=CURVE_KEYS + (MOE_KEYS if moe else ()))


@pytest.mark.parametrize("layout, stage, sbp, model, accum", PARAMS)
def test_cell(matrix, layout, stage, sbp, model, accum):
    reference, result = matrix
    ref = reference(reference_key(layout, model, accum))
    assert_matches(result((layout, stage, sbp, model, accum)), ref, moe=model == "moe")


def test_the_reference_must_split_like_the_cell(matrix):
    """Why each cell's reference has the cell's accumulation: with global balancing the running
    totals make the MoE step depend on the micro-batch split (same cross-entropy, other balancing
    loss and router gradients), while the dense step does not (global-count normalisation)."""
    reference, _ = matrix
    dense1, dense2 = reference(("dense", 1, 1)), reference(("dense", 2, 1))
    assert_matches(dense2, dense1, moe=False)
    moe1, moe2 = reference(("moe", 1, 1)), reference(("moe", 2, 1))
    assert_scalar(moe2["loss"], moe1["loss"], STEP1_RTOL, "loss", 1)  # the logged loss is the cross-entropy
    assert moe2["metrics"][0]["moe/lbl"] != pytest.approx(moe1["metrics"][0]["moe/lbl"], rel=1e-4)
    gates = [n for n in moe1["grads"] if n.endswith("mlp.gate.weight")]
    assert gates and any((moe2["grads"][n] - moe1["grads"][n]).abs().max() > 1e-3 * moe1["grads"][n].abs().max()
                         for n in gates)
