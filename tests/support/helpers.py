"""Helpers shared by the test modules: the small training recipe, config composition, in-process
and torchrun training runs, the CLI, a fake W&B module and the tiny MoE model (curve comparison:
support/parity.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from longtrain.config import Config, register_configs
from longtrain.models import ModelArgs
from longtrain.train import RECIPES_DIR, run

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent  # scripts the tests execute (fault_worker.py)

# A small, fast variant of the default recipe: 4 sequences of 256 tokens per step, loss on every token.
SMALL = ["model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2", "data.mode=pretrain",
         "data.seq_len=256", "data.global_batch_size=4", "data.passkey.num_train=48", "data.passkey.num_eval=4",
         "data.passkey.min_chars=60", "data.passkey.max_chars=150", "trainer.eval_every=0", "trainer.max_steps=4",
         "optim.warmup_steps=2", "checkpoint.every=0", "logging.progress=false", "trainer.device=cpu"]
GQA = ["model.num_heads=4", "model.num_kv_heads=2"]


def compose_cfg(overrides, recipe="tiny") -> Config:
    register_configs()
    with initialize_config_dir(config_dir=RECIPES_DIR, version_base=None):
        dcfg = compose(config_name=recipe, overrides=list(overrides))
    return OmegaConf.to_object(dcfg)


def read_metrics(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_in_process(tmp_path, name, overrides):
    run_dir = tmp_path / name
    cfg = compose_cfg(SMALL + [f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"] + list(overrides))
    run(cfg)
    return read_metrics(run_dir)


def train_torchrun(tmp_path, name, nproc, overrides):
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "longtrain.train", f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(run_dir)


def cli(*overrides, env=None):
    return subprocess.run([sys.executable, "-m", "longtrain.train", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def common(tmp, name):
    """The ZeRO tests' run: SMALL with GQA heads, 3 steps of micro-batch 1, in ``tmp/name``."""
    return SMALL + GQA + [f"run.dir={tmp / name}", f"data.cache_dir={tmp / 'cache'}", "trainer.max_steps=3",
                          "data.micro_batch_size=1"]


class FakeWandb(types.ModuleType):
    """Stands in for the ``wandb`` module: records every ``init`` and ``log`` call."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logged.append((step, data))

            def finish(self):
                fake.finished += 1

        class Histogram:
            def __init__(self, np_histogram):
                self.np_histogram = np_histogram

        self._run, self.Histogram, self.Image = Run, Histogram, lambda path: ("image", path)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self._run()


def moe_args(**overrides) -> ModelArgs:
    """The tiny Qwen3-MoE geometry of the MoE tests (6 experts, top 2), with ``overrides``."""
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                arch="qwen3_moe", qk_norm=True, num_experts=6, top_k=2, moe_intermediate_size=48)
    return ModelArgs(**{**base, **overrides})


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norms and a router of the experts' scale, so every mapping is exercised."""
    torch.manual_seed(seed)
    for name, p in module.named_parameters():
        p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
