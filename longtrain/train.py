"""Entry point: ``python -m longtrain.train [--config-name RECIPE] [key=value ...]``.

Hydra composes the recipe from ``recipes/`` (or ``--config-dir``) over the typed schema; the
config is converted once to dataclasses (running every validation) and handed to the trainer.
Configuration and data errors print one line naming the key, file or value and exit with code 2;
faults that end a run (:class:`~longtrain.trainer.faults.TrainingFault`: a non-finite step, a
failed checkpoint save, a dead rank or a timed-out collective) print one line and exit with code 1.
A graceful stop (SIGTERM, SIGUSR1 or ``run.dir/STOP``) saves a checkpoint and exits with code 0.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from longtrain.config import Config, ConfigError, register_configs

RECIPES_DIR = str(Path(__file__).resolve().parent.parent / "recipes")
log = logging.getLogger("longtrain")


def to_config(dcfg: DictConfig) -> Config:
    """The composed config as typed dataclasses, every ``__post_init__`` check run.

    Merging into the schema first also rejects keys the schema lacks, even ones added with
    Hydra's ``+key=value`` syntax (nothing given on the command line is silently ignored).
    """
    _reject_unknown_keys(dcfg, Config, "")
    return OmegaConf.to_object(dcfg)


def _reject_unknown_keys(node: DictConfig, schema, prefix: str) -> None:
    defaults = schema()
    names = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: not a valid key (check its spelling against longtrain/config/)")
        child, default = node[key], getattr(defaults, key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(default):
            _reject_unknown_keys(child, type(default), f"{prefix}{key}.")


def run(cfg: Config, config_yaml: str = ""):
    """Train with an already validated config in this process (joins torchrun's group if any)."""
    from longtrain.parallel.distributed import broadcast_object, destroy_distributed, init_distributed
    from longtrain.trainer.loop import Trainer
    from longtrain.trainer.metrics import save_resolved_config

    dist_info = init_distributed(cfg.trainer.device, cfg.parallel.backend, cfg.parallel.timeout_s,
                                 require_group=cfg.zero.stage > 0)
    logging.basicConfig(level=logging.INFO if dist_info.is_writer else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        # One run directory for every rank, whatever each rank's interpolations produced.
        cfg.run.dir = broadcast_object(cfg.run.dir)
        if dist_info.is_writer:
            Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
            save_resolved_config(Path(cfg.run.dir), config_yaml or OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            record_environment(cfg.run.dir)
        return Trainer(cfg, dist_info, config_yaml).fit()
    finally:
        destroy_distributed()


def record_environment(run_dir: str) -> None:
    """Write ``run_dir/env/`` (:mod:`longtrain.trainer.environment`); a failure only warns."""
    try:
        from longtrain.trainer.environment import dump_environment

        for problem in dump_environment(run_dir):
            log.warning("environment: %s", problem)
    except Exception as e:  # noqa: BLE001 - recording the environment must never stop a run
        log.warning("environment: not recorded in %s/env: %s: %s", run_dir, type(e).__name__, e)


def sweep_job_config(dcfg: DictConfig) -> None:
    """Under ``--multirun``, give this job its own run: ``run.dir`` becomes Hydra's job directory
    ``hydra.sweep.dir/hydra.sweep.subdir`` (``<run.dir>-<time>/<job number>`` in the shipped
    recipes), the run name ``<run.name or sweep directory>-<job number>`` and, when unset, the W&B
    group the sweep directory's name, so the sweep's runs sit together. Outside multirun nothing
    changes."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    hc = HydraConfig.get()
    sweep_name = Path(hc.sweep.dir).name
    dcfg.run.dir = hc.runtime.output_dir
    dcfg.run.name = f"{dcfg.run.name or sweep_name}-{hc.job.num}"
    if dcfg.logging.wandb.group is None:
        dcfg.logging.wandb.group = sweep_name


@hydra.main(version_base=None, config_path=RECIPES_DIR, config_name="tiny")
def _hydra_main(dcfg: DictConfig) -> None:
    from longtrain.trainer.faults import TrainingFault

    try:
        sweep_job_config(dcfg)
        cfg = to_config(dcfg)
        run(cfg, OmegaConf.to_yaml(dcfg, resolve=True))
    except (ValueError, FileNotFoundError, TrainingFault) as err:
        if os.environ.get("LONGTRAIN_FULL_ERROR") == "1":
            raise
        print(f"longtrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(err, TrainingFault) else 2)


def _one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one line naming the key (their own text spans several)."""
    while err.__cause__ is not None and not getattr(err, "full_key", None):
        err = err.__cause__
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    if text.startswith("Key '") and "not in" in text:
        text += " (not a valid key: check its spelling against longtrain/config/)"
    return f"{key}: {text}" if key and key not in text else text


def check_layout(cfg: Config, world_size: int) -> None:
    """Checks that need the world size (torchrun's ``WORLD_SIZE``): the parallel degrees and the
    batch split ``micro_batch_size x grad_accum x dp = global_batch_size`` (the DeepSpeed batch
    config under ZeRO is derived from the same three numbers).

    Raises:
        ValueError: naming the key and a consistent value.
    """
    from longtrain.parallel.dims import ParallelDims
    from longtrain.trainer.build import resolve_batch_layout

    dims = ParallelDims(world_size=world_size, ulysses=cfg.parallel.sp.ulysses, ring=cfg.parallel.sp.ring)
    resolve_batch_layout(cfg.data.global_batch_size, cfg.data.micro_batch_size, cfg.trainer.grad_accum, dims.dp)


def sweep_jobs(overrides: List[str]) -> Optional[List[List[str]]]:
    """The override lists of the jobs ``--multirun`` runs: the cartesian product of the
    comma-separated, ``range`` and ``choice`` sweeps, as Hydra's basic sweeper forms it (``hydra.*``
    overrides left out); None when another sweeper is chosen (``hydra/sweeper=...``).

    Raises:
        ValueError: a sweep the basic sweeper cannot run (``interval``), naming the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.get_key_element().lstrip("+~").startswith("hydra/sweeper") for o in parsed):
        return None
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if key.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        if not override.is_sweep_override():
            choices.append([f"{key}={override.get_value_element_as_str()}"])
        elif override.is_discrete_sweep():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            raise ValueError(f"{key}: interval() sweeps need a sweeper plugin "
                             "(hydra/sweeper=...); the default sweeper takes a,b,c, range() or choice()")
    return [list(job) for job in itertools.product(*choices)]


def precheck(argv: List[str]) -> Optional[str]:
    """Compose and validate the config the command line asks for; the one-line error, or None.

    Plain runs (``--config-name``/``--config-dir`` and overrides) and every job of a
    ``--multirun`` sweep are checked here so that every bad key or value is reported in one line
    before any work; other Hydra modes (``--cfg``, ``--help``, ...) are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    name, config_dir, overrides, multirun, i = "tiny", RECIPES_DIR, [], False, 0
    while i < len(argv):
        arg = argv[i]
        flag, _, value = arg.partition("=")
        if flag in ("--config-name", "-cn", "--config-dir", "-cd"):
            if not value:
                i += 1
                value = argv[i] if i < len(argv) else ""
            if flag in ("--config-name", "-cn"):
                name = value
            else:
                config_dir = str(Path(value).resolve())
        elif arg in ("--multirun", "-m"):
            multirun = True
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
        i += 1
    try:
        jobs = sweep_jobs(overrides) if multirun else [overrides]
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            for job in jobs or []:
                cfg = to_config(compose(config_name=name, overrides=job))
                check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
                run_dir = Path(cfg.run.dir)  # under --multirun only the sweep's name starts with it
                if not multirun and run_dir.exists() and not run_dir.is_dir():
                    return f"run.dir: '{cfg.run.dir}' exists and is not a directory; choose another run.dir"
    except MissingConfigException:
        recipes = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
        return f"unknown recipe '{name}' in {config_dir}; choose one of: {', '.join(recipes)}"
    except Exception as err:  # noqa: BLE001 - every composition error becomes one line
        return _one_line(err)
    return None


def main() -> None:
    """Console-script entry point (``longtrain-train``)."""
    register_configs()
    error = precheck(sys.argv[1:])
    if error is not None:
        print(f"longtrain: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
