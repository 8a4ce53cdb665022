"""Validation before any work: compose the config the command line asks for and check everything
cheap (keys, values, types, the layout against the world size, the model against the layout, the
paths the config names), so that a bad input is one line before a rank starts or a file is written.
launch/run.sh runs it once before torchrun (``python -m longtrain.train --precheck ...``).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from longtrain.config import Config, ConfigError
from longtrain.errors import DEFAULT_CACHE, describe_os_error, first_line

RECIPES_DIR = str(Path(__file__).resolve().parent.parent / "recipes")

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


def _one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one line naming the key (their own text spans several)."""
    while err.__cause__ is not None and not getattr(err, "full_key", None):
        err = err.__cause__
    text = first_line(err)
    key = getattr(err, "full_key", None)
    if text.startswith("Key '") and "not in" in text:
        text += " (not a valid key: check its spelling against longtrain/config/)"
    converted = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (Integer|Float)", text)
    if converted and key:
        kind = {"Integer": "a whole number", "Float": "a number"}[converted.group(3)]
        default = _schema_default(key)
        example = f", e.g. {key}={default}" if default is not None else ""
        return f"{key}: must be {kind}, got {converted.group(1)!r} ({converted.group(2)}){example}"
    elif "is not a valid bool" in text and key:
        text += "; use true or false"
    return f"{key}: {text}" if key and key not in text else text


def _schema_default(key: str):
    """The schema's default of the dotted ``key``, or None."""
    node = Config()
    for part in key.split("."):
        node = getattr(node, part, None)
    return node if isinstance(node, (int, float, str, bool)) else None


def _override_problem(override: str) -> Optional[str]:
    """What is wrong with one command-line override's form, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "=" not in override and not override.startswith("~"):
        return (f"'{override}': an override needs the form key=value (e.g. {override}=...); "
                "to delete a key write ~key, and flags start with --")
    key = override.split("=", 1)[0]
    try:
        OverridesParser.create().parse_overrides([override])
    except Exception as err:  # noqa: BLE001 - Hydra's parser errors become one line naming the key
        text = first_line(err)
        return (f"{key.lstrip('+~')}: cannot parse the override '{override}' ({text}); check its brackets and "
                "quotes: a list is key=[a,b], a value with special characters is quoted, key='...'")
    return None


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mkdir_refusal(parent: Path) -> Optional[OSError]:
    """The error making a directory in ``parent`` raises, or None: one is made and removed at once.

    ``os.access`` cannot tell: it answers yes to root everywhere, yet sysfs, procfs and some
    mounts refuse ``mkdir`` (EPERM) even to root, which then happened in Hydra's own run-directory
    creation, outside the error boundary, as a traceback.
    """
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".longtrain-probe-", dir=parent))
    except OSError as err:
        return err
    return None


def writable_dir_problem(key: str, value: str) -> Optional[str]:
    """Why the directory ``value`` (config key ``key``) cannot be used or created for writing, or None.

    Looks first (a file in the way, permissions, a read-only mount); then, where those pass, makes
    and removes a probe directory in ``value`` or its first existing parent (:func:`_mkdir_refusal`),
    so nothing is left behind.
    """
    path = Path(os.path.expanduser(value)).absolute()
    if path.exists() and not path.is_dir():
        return f"{key}: '{value}' exists and is not a directory; choose another {key}"
    probe = _first_existing(path)
    if not probe.is_dir():
        return f"{key}: cannot create '{value}': '{probe}' is a file, not a directory; choose another {key}"
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        cause = "read-only file system" if read_only else "permission denied"
        where = f"'{value}'" if probe == path else f"'{value}' in '{probe}'"
        fix = "a writable file system" if read_only else "a directory you can write to (or fix its permissions)"
        return f"{key}: cannot write {where}: {cause}; choose another {key} on {fix}"
    refused = _mkdir_refusal(probe)
    if refused is not None:  # named by the user's path, not the probe's
        return describe_os_error(OSError(refused.errno, refused.strerror, value), key=key)
    return None


def check_paths(cfg: Config) -> None:
    """The paths of a plain run, checked before anything is created: ``run.dir`` and
    ``data.cache_dir`` must be writable directories (or creatable), ``model.hf_path`` a complete
    Hugging Face directory.

    Raises:
        ConfigError: naming the key, the path and the cause.
    """
    for key, value in (("run.dir", cfg.run.dir), ("data.cache_dir", cfg.data.cache_dir or DEFAULT_CACHE)):
        problem = writable_dir_problem(key, value)
        if problem is not None:
            raise ConfigError(problem)
    if cfg.model.hf_path is not None:
        from longtrain.models.hf import check_hf_dir

        check_hf_dir(cfg.model.hf_path)


def check_layout(cfg: Config, world_size: int) -> None:
    """What the trainer checks before it builds anything (:func:`~longtrain.trainer.build.layout_run`,
    the same function): the parallel degrees against the world size and the sequence, the model
    geometry (registry entry with the overrides, or ``model.hf_path``'s config.json) and its heads
    against the layout, and the batch split ``micro_batch_size x grad_accum x dp =
    global_batch_size``; then ``model.init_from``'s geometry and, for a ZeRO checkpoint, its files
    (:func:`~longtrain.trainer.init_from.check_loadable`). No process group, no tensor.

    Raises:
        ValueError: naming the key and a consistent value.
    """
    import torch

    from longtrain.trainer.build import layout_run

    layout = layout_run(cfg, world_size, torch.device("cpu"), build_groups=False)
    if cfg.model.init_from is not None:
        from longtrain.trainer.init_from import check_geometry, check_loadable, find_checkpoint

        checkpoint = find_checkpoint(cfg.model.init_from, "model.init_from")
        check_geometry(checkpoint, layout.args, "model.init_from")
        check_loadable(checkpoint, "model.init_from")


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


def recipe_args(argv: List[str]):
    """(recipe name, recipe folder, overrides, multirun) of a training command line; a one-line
    problem (str) for a bad ``--config-dir``; None when it holds another flag (left to Hydra)."""
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
                if not Path(config_dir).is_dir():
                    return f"--config-dir: '{value}' is not a directory; give the folder holding the recipes (*.yaml)"
                if not any(Path(config_dir).glob("*.yaml")):
                    return f"--config-dir: '{value}' holds no recipes (*.yaml files)"
        elif arg in ("--multirun", "-m"):
            multirun = True
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
        i += 1
    return name, config_dir, overrides, multirun


def compose_config(argv: List[str]) -> Config:
    """The typed config of a plain (not ``--multirun``) command line that :func:`precheck` accepted."""
    from hydra import compose, initialize_config_dir

    name, config_dir, overrides, _ = recipe_args(argv)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return to_config(compose(config_name=name, overrides=overrides))


def compose_saved_config(path: Path, overrides: List[str]) -> Config:
    """The config a run saved (its resolved ``config.yaml``) with command-line ``overrides`` applied,
    checked like a recipe (``longtrain-eval`` evaluates a run with the config it trained with).

    Raises:
        ConfigError: a malformed override, an unknown key or a bad value, in one line naming the key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in overrides:
        problem = _override_problem(override)
        if problem is not None:
            raise ConfigError(problem)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.get_key_element().lstrip("+~")
            if override.is_delete():
                OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.structured(Config), key), merge=False)
            else:
                OmegaConf.update(cfg, key, override.value(), merge=True)
        return to_config(cfg)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - every composition error becomes one line
        if isinstance(err, ValueError) and not hasattr(err, "full_key"):
            raise ConfigError(" ".join(line.strip() for line in str(err).strip().splitlines())) from None
        raise ConfigError(_one_line(err)) from None


def precheck(argv: List[str], world_size: Optional[int] = None) -> Optional[str]:
    """Compose and validate the config the command line asks for; the one-line error, or None.

    Plain runs (``--config-name``/``--config-dir`` and overrides) and every job of a
    ``--multirun`` sweep are checked here so that every bad key or value is reported in one line
    before any work: the overrides' form, the schema checks, the layout against ``WORLD_SIZE``,
    the model geometry and, for a plain run, the paths (:func:`check_paths`). Nothing is left behind
    (the path check makes and removes a probe directory).
    Other Hydra modes (``--cfg``, ``--help``, ...) are left to Hydra. ``world_size`` replaces
    ``WORLD_SIZE`` (the planner checks the layout it is asked to plan).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    parsed = recipe_args(argv)
    if isinstance(parsed, str):
        return parsed
    if parsed is None:
        return None
    name, config_dir, overrides, multirun = parsed
    for override in overrides:
        problem = _override_problem(override)
        if problem is not None:
            return problem
    try:
        jobs = sweep_jobs(overrides) if multirun else [overrides]
        if world_size is None:
            world = os.environ.get("WORLD_SIZE", "1")
            if not world.isdigit() or int(world) < 1:
                return f"WORLD_SIZE: must be a positive whole number (torchrun sets it), got {world!r}; unset it to run alone"
            world_size = int(world)
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            for job in jobs or []:
                cfg = to_config(compose(config_name=name, overrides=job))
                if not multirun:  # under --multirun only the sweep's name starts with run.dir
                    check_paths(cfg)  # first: the layout reads model.hf_path's config.json
                check_layout(cfg, world_size)
    except MissingConfigException:
        recipes = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
        return f"unknown recipe '{name}' in {config_dir}; choose one of: {', '.join(recipes)}"
    except Exception as err:  # noqa: BLE001 - every composition error becomes one line
        if isinstance(err, ValueError) and not hasattr(err, "full_key"):
            return " ".join(line.strip() for line in str(err).strip().splitlines())
        return _one_line(err)
    return None
