"""Entry point: ``python -m longtrain.train [--config-name RECIPE] [key=value ...]``.

Hydra composes the recipe from ``recipes/`` (or ``--config-dir``) over the typed schema; the
config is converted once to dataclasses (running every validation) and handed to the trainer.
Configuration and data errors print one line naming the key, file or value and exit with code 2.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from longtrain.config import Config, register_configs

RECIPES_DIR = str(Path(__file__).resolve().parent.parent / "recipes")
log = logging.getLogger("longtrain")


def run(cfg: Config, config_yaml: str = ""):
    """Train with an already validated config in this process (joins torchrun's group if any)."""
    from longtrain.parallel.distributed import broadcast_object, destroy_distributed, init_distributed
    from longtrain.trainer.loop import Trainer
    from longtrain.trainer.metrics import save_resolved_config

    dist_info = init_distributed(cfg.trainer.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    logging.basicConfig(level=logging.INFO if dist_info.is_writer else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        # One run directory for every rank, whatever each rank's interpolations produced.
        cfg.run.dir = broadcast_object(cfg.run.dir)
        if dist_info.is_writer and config_yaml:
            Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
            save_resolved_config(Path(cfg.run.dir), config_yaml)
        return Trainer(cfg, dist_info, config_yaml).fit()
    finally:
        destroy_distributed()


@hydra.main(version_base=None, config_path=RECIPES_DIR, config_name="tiny")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg: Config = OmegaConf.to_object(dcfg)
        run(cfg, OmegaConf.to_yaml(dcfg, resolve=True))
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("LONGTRAIN_FULL_ERROR") == "1":
            raise
        print(f"longtrain: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    """Console-script entry point (``longtrain-train``)."""
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
