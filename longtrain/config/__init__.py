"""Typed configuration schema, registered in Hydra's ConfigStore.

YAML recipes in ``recipes/`` only give values; this package defines every key, its type, its
default and what it means. The entry point converts the composed config once with
``OmegaConf.to_object`` (which runs each ``__post_init__`` check) and hands typed sub-configs
down: nothing below ``longtrain.train`` sees a ``DictConfig``.

User errors raise :class:`ConfigError` (a ``ValueError``) naming the key and the fix.

The schema is split by config group; every name is importable from ``longtrain.config``:

- ``schema_model``: ``model.*`` (``ModelConfig``, ``MoEConfig``);
- ``schema_data``: ``data.*`` (``DataConfig``, ``PasskeyConfig``, ``DomainsConfig``);
- ``schema_parallel``: ``parallel.*``, ``zero.*``, ``memory.*``;
- ``schema_train``: ``run.*``, ``optim.*``, ``trainer.*``, ``logging.*``, ``checkpoint.*``, ``moe.*``;
- ``domains``: the domain names and mix check ``data.domains`` is validated with;
- ``errors``: :class:`ConfigError`.

This module composes the groups into :class:`Config` and registers it in Hydra's ConfigStore
(checks that span groups run where the run is built: ``longtrain.precheck``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from longtrain.config.domains import DOMAIN_NAMES, domain_probabilities
from longtrain.config.errors import ConfigError
from longtrain.config.schema_data import DataConfig, DomainsConfig, PasskeyConfig
from longtrain.config.schema_model import ModelConfig, MoEConfig
from longtrain.config.schema_parallel import (ZERO_OWNED_KEYS, MemoryConfig, ParallelConfig, SequenceParallelConfig,
                                              StreamBPConfig, ZeroConfig)
from longtrain.config.schema_train import (BalanceConfig, CheckpointConfig, LoggingConfig, MoETrainConfig,
                                           OptimConfig, RunConfig, TrainerConfig, WandbConfig)

__all__ = [
    "BalanceConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DOMAIN_NAMES", "DomainsConfig",
    "LoggingConfig", "MemoryConfig", "ModelConfig", "MoEConfig", "MoETrainConfig", "OptimConfig", "ParallelConfig",
    "PasskeyConfig", "RunConfig", "SequenceParallelConfig", "StreamBPConfig", "TrainerConfig", "WandbConfig",
    "ZERO_OWNED_KEYS", "ZeroConfig", "domain_probabilities", "register_configs",
]


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    moe: MoETrainConfig = field(default_factory=MoETrainConfig)


def register_configs() -> None:
    """Register the schema as ``longtrain_schema`` so recipes can list it in their defaults."""
    ConfigStore.instance().store(name="longtrain_schema", node=Config)
