"""ParallelDims arithmetic and the gradient all-reduce (2 gloo processes)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.distributed import all_reduce_gradients
from support.harness import run_ranks


def test_dims_default_to_data_parallel():
    dims = ParallelDims(world_size=4)
    assert (dims.dp, dims.sp) == (4, 1) and dims.size("dp") == 4


def test_dims_reject_mismatch():
    with pytest.raises(ValueError, match="valid choice: dp=4"):
        ParallelDims(world_size=4, dp=3)
    with pytest.raises(ValueError, match=r"must be one of \[1, 2, 3, 6\]"):
        ParallelDims(world_size=6, ulysses=4)


@pytest.mark.parametrize("world, u, r", [(8, 2, 2), (4, 2, 1), (4, 1, 2), (4, 4, 1), (8, 1, 4), (1, 1, 1)])
def test_groups_partition_the_world(world, u, r):
    dims = ParallelDims(world_size=world, ulysses=u, ring=r)
    for axis in ("dp", "ring", "ulysses", "sp"):
        groups = {tuple(dims.group_ranks(axis, rank)) for rank in range(world)}
        members = sorted(x for g in groups for x in g)
        assert members == list(range(world)), axis  # every rank in exactly one group
        assert all(len(g) == dims.size(axis) for g in groups)
    # Ulysses groups are consecutive ranks; ring neighbours are `ulysses` apart.
    assert dims.group_ranks("ulysses", world - 1) == list(range(world - u, world))
    assert dims.group_ranks("ring", 0) == [i * u for i in range(r)]
    for rank in range(world):
        c = dims.coords(rank)
        assert rank == (c["dp"] * r + c["ring"]) * u + c["ulysses"]
        assert dims.group_ranks("sp", rank) == sorted(set(dims.group_ranks("sp", rank)))


def test_head_and_length_validation():
    ParallelDims(world_size=4, ulysses=4).validate_model(num_heads=32, num_kv_heads=8)
    ParallelDims(world_size=8, ulysses=8).validate_model(num_heads=32, num_kv_heads=2)  # KV replicated
    with pytest.raises(ValueError, match=r"ulysses=4 does not divide model.num_heads=6.*\[1, 2, 3, 6\].*parallel.sp.ring"):
        ParallelDims(world_size=4, ulysses=4).validate_model(num_heads=6, num_kv_heads=6)
    ParallelDims(world_size=4, ulysses=2, ring=2).validate_seq_len(64)
    with pytest.raises(ValueError, match="data.seq_len=100 must be a multiple of 8"):
        ParallelDims(world_size=4, ulysses=2, ring=2).validate_seq_len(100)



def _worker(rank, world):
    dims = ParallelDims(world_size=world, ulysses=2)
    dims.build_groups()
    groups = {axis: dims.group_ranks(axis, rank) for axis in ("dp", "ulysses", "sp")}
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 1000, 7)]
    for p in params:
        p.grad = torch.randn_like(p)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no grad: skipped
    local = [p.grad.clone() for p in params[:3]]
    all_reduce_gradients(params, dims.group("dp_sp"), bucket_bytes=64)  # tiny buckets exercise the bucketing
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=dims.group("ulysses"))
    return [p.grad for p in params[:3]], local, groups, t.item(), dims.rank("ulysses"), dims.rank("dp")


def test_gradients_are_summed_and_groups_work():
    world = 2
    results = run_ranks(_worker, world)
    expected = [results[0][1][i] + results[1][1][i] for i in range(3)]
    for rank in range(world):
        grads, _, groups, ulysses_sum, u_rank, dp_rank = results[rank]
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert groups == {"dp": [rank], "ulysses": [0, 1], "sp": [0, 1]}
        assert ulysses_sum == 1.0 and (u_rank, dp_rank) == (rank, 0)
