"""Entry point: ``python -m longtrain.train [--config-name RECIPE] [key=value ...]``.

Hydra composes the recipe from ``recipes/`` (or ``--config-dir``) over the typed schema; the
config is converted once to dataclasses (running every validation) and handed to the trainer.
Configuration and data errors print one line naming the key, file or value and exit with code 2;
faults that end a run (:class:`~longtrain.trainer.faults.TrainingFault`: a non-finite step, a
failed checkpoint save, a dead rank or a timed-out collective) print one line and exit with code 1.
A graceful stop (SIGTERM, SIGUSR1 or ``run.dir/STOP``) saves a checkpoint and exits with code 0.

Errors meet one boundary (:mod:`longtrain.errors`): the last line on stderr is
``longtrain: error: ...`` whatever was raised; a file-system refusal or an undecodable file during
start-up names the config key its path came from. ``LONGTRAIN_FULL_ERROR=1`` lets errors raise
with their traceback. ``--precheck`` only validates (:mod:`longtrain.precheck`; launch/run.sh runs
it once before torchrun).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from longtrain.config import Config, register_configs
from longtrain.errors import FULL_ERROR_ENV, error_boundary, report_error, setup_error
from longtrain.precheck import RECIPES_DIR, precheck, to_config

log = logging.getLogger("longtrain")


def run(cfg: Config, config_yaml: str = ""):
    """Train with an already validated config in this process (joins torchrun's group if any).

    Setup (everything before the first step) goes through :func:`setup_error`: an ``OSError``, a
    torn JSON or safetensors file becomes a :class:`SetupError` naming the config key and the path.
    ``run.dir/config.yaml`` and ``env/`` are written once the trainer is built, so a refused start
    leaves nothing behind (an empty ``run.dir`` it leaves is removed).
    """
    from longtrain.parallel.distributed import broadcast_object, destroy_distributed, init_distributed
    from longtrain.trainer.loop import Trainer
    from longtrain.trainer.metrics import save_resolved_config

    try:
        try:
            dist_info = init_distributed(cfg.trainer.device, cfg.parallel.backend, cfg.parallel.timeout_s,
                                         require_group=cfg.zero.stage > 0)
            logging.basicConfig(level=logging.INFO if dist_info.is_writer else logging.WARNING,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
            # One run directory for every rank, whatever each rank's interpolations produced.
            cfg.run.dir = broadcast_object(cfg.run.dir)
            if dist_info.is_writer:
                Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
            trainer = Trainer(cfg, dist_info, config_yaml)
            if dist_info.is_writer:
                save_resolved_config(Path(cfg.run.dir), config_yaml or OmegaConf.to_yaml(OmegaConf.structured(cfg)))
                record_environment(cfg.run.dir)
        except Exception as err:
            discard_refused_start(Path(cfg.run.dir))  # Hydra may have created it for this start
            converted = setup_error(err, cfg)
            if converted is None:
                raise
            raise converted from err
        return trainer.fit()
    finally:
        destroy_distributed()


def discard_refused_start(run_dir: Path) -> None:
    """After a start that failed before its first step: remove what it left in ``run_dir`` (an empty
    metrics file) and ``run_dir`` itself when nothing else is in it."""
    try:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size == 0:
            metrics.unlink()
        run_dir.rmdir()  # only succeeds when empty
    except OSError:
        pass


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
    cfg = None
    with error_boundary(lambda: cfg):
        sweep_job_config(dcfg)
        cfg = to_config(dcfg)
        run(cfg, OmegaConf.to_yaml(dcfg, resolve=True))


def _config_or_none(argv: List[str]) -> Optional[Config]:
    """The config of a plain command line, for the error line to name the key of a path; None when
    it does not compose (asked only after an error)."""
    from longtrain.precheck import compose_config

    try:
        return compose_config(argv)
    except Exception:  # noqa: BLE001 - only a better error line is at stake
        return None


def cli_main(argv: List[str]) -> int:
    """The command line ``argv`` (without the program name); returns the exit code.

    ``--precheck`` as the first argument only validates (:func:`precheck`; launch/run.sh runs it
    once before torchrun). Errors are printed as one ``longtrain: error:`` line on stderr.
    """
    register_configs()
    if os.environ.get(FULL_ERROR_ENV) == "1":
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra then re-raises instead of trimming the traceback
    check_only = bool(argv) and argv[0] == "--precheck"
    if check_only:
        argv = argv[1:]
    try:
        with error_boundary(lambda: _config_or_none(argv)):
            error = precheck(argv)
            if error is not None:
                report_error(f"longtrain: error: {error}", 2)
                return 2
            if check_only:
                return 0
            saved, hydra_full = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
            sys.argv = [saved[0] if saved else "longtrain.train", *argv]
            # Hydra makes the run directory before _hydra_main's own boundary is entered, and would
            # print its own traceback on a failure there: let it raise into this boundary instead.
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                _hydra_main()
            finally:
                sys.argv = saved
                if hydra_full is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = hydra_full
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def main() -> None:
    """Console-script entry point (``longtrain-train``)."""
    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
