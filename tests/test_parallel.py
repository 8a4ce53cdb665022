"""ParallelDims arithmetic and the gradient all-reduce (2 gloo processes)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longtrain.parallel.dims import ParallelDims
from longtrain.parallel.distributed import all_reduce_gradients


def test_dims_default_to_data_parallel():
    dims = ParallelDims(world_size=4)
    assert dims.dp == 4 and dims.size("dp") == 4


def test_dims_reject_mismatch():
    with pytest.raises(ValueError, match="valid choice: dp=4"):
        ParallelDims(world_size=4, dp=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 1000, 7)]
    for p in params:
        p.grad = torch.randn_like(p)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no grad: skipped
    local = [p.grad.clone() for p in params[:3]]
    all_reduce_gradients(params, None, bucket_bytes=64)  # tiny buckets exercise the bucketing
    out[rank] = ([p.grad for p in params[:3]], local)
    dist.destroy_process_group()


def test_gradients_are_summed_not_averaged():
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world)
        results = dict(out)
    expected = [results[0][1][i] + results[1][1][i] for i in range(3)]
    for rank in range(world):
        for got, want in zip(results[rank][0], expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
