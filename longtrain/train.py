"""Entry point: ``python -m longtrain.train [--config-name RECIPE] [key=value ...]``.

Hydra composes the recipe from ``recipes/`` (or ``--config-dir``) over the typed schema; the
config is converted once to dataclasses (running every validation) and handed to the trainer.
Configuration and data errors print one line naming the key, file or value and exit with code 2;
faults that end a run (:class:`~longtrain.trainer.faults.TrainingFault`: a non-finite step, a
failed checkpoint save, a dead rank or a timed-out collective) print one line and exit with code 1.
A graceful stop (SIGTERM, SIGUSR1 or ``run.dir/STOP``) saves a checkpoint and exits with code 0.

Errors meet one boundary (:func:`error_boundary`, :func:`error_line`): the last line on stderr is
``longtrain: error: ...`` whatever was raised; a file-system refusal or an undecodable file during
start-up names the config key its path came from (:func:`setup_error`). ``LONGTRAIN_FULL_ERROR=1``
lets errors raise with their traceback. ``--precheck`` only validates (launch/run.sh runs it once
before torchrun).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

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


# ------------------------------------------------------------------------------ error boundary
FULL_ERROR_ENV = "LONGTRAIN_FULL_ERROR"
"""Set to 1 to let errors raise with their full traceback instead of the one ``longtrain: error:`` line."""
ERROR_FILE_ENV = "LONGTRAIN_ERROR_FILE"
"""A file each rank appends ``<exit code><TAB><error line>`` to before it exits (launch/run.sh reads it)."""


class SetupError(ConfigError):
    """Start-up failed on a file or directory the config names: the message names the key, the path
    and the cause."""


_OS_CAUSES = {
    errno.EACCES: ("permission denied", "choose a path you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you can write to, or fix its permissions"),
    errno.EROFS: ("read-only file system", "choose a path on a writable file system"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path"),
    errno.EISDIR: ("is a directory, a file was expected", "give the file's path"),
    errno.EEXIST: ("exists already", "choose another path"),
    errno.ENOENT: ("does not exist", "check the path"),
    errno.ENOSPC: ("the disk is full", "free space there"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.ELOOP: ("too many symbolic links", "check the path"),
}
_DEFAULT_CACHE = "~/.cache/longtrain"


def _path_keys(cfg: Optional[Config]) -> List[tuple]:
    """(config key, absolute path) of every path the config names."""
    if cfg is None:
        return []
    pairs = [("run.dir", cfg.run.dir), ("data.cache_dir", cfg.data.cache_dir or _DEFAULT_CACHE),
             ("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source),
             ("data.tokenizer", cfg.data.tokenizer), ("model.hf_path", cfg.model.hf_path),
             ("checkpoint.resume", cfg.checkpoint.resume)]
    return [(k, os.path.abspath(os.path.expanduser(str(v)))) for k, v in pairs
            if v and str(v) not in ("passkey", "domains", "byte", "auto", "none", "latest")]


def key_of_path(cfg: Optional[Config], filename: str) -> Optional[str]:
    """The config key whose path holds ``filename`` (the deepest one), or None."""
    target = os.path.abspath(os.path.expanduser(str(filename)))
    best = None
    for key, path in _path_keys(cfg):
        if target == path or target.startswith(path.rstrip(os.sep) + os.sep):
            if best is None or len(path) > len(best[1]):
                best = (key, path)
    return best and best[0]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe_os_error(err: OSError, cfg: Optional[Config] = None, key: Optional[str] = None) -> str:
    """An ``OSError`` as ``<key>: cannot use '<path>': <cause>; <fix>``."""
    filename = err.filename if err.filename is not None else err.filename2
    key = key or (key_of_path(cfg, filename) if filename is not None else None)
    cause, fix = _OS_CAUSES.get(err.errno, (err.strerror or _first_line(err), "check the path"))
    if key is not None:
        fix += f" (set {key})" if "path" in fix else ""
    where = f"cannot use '{filename}'" if filename is not None else "a file operation failed"
    return f"{key + ': ' if key else ''}{where}: {cause}; {fix}"


def setup_error(err: BaseException, cfg: Optional[Config] = None) -> Optional[SetupError]:
    """The one-line :class:`SetupError` for a start-up failure that a bad path or file explains
    (an ``OSError``, a JSON or safetensors file that does not decode), or None to let ``err`` go on."""
    from longtrain.trainer.faults import TrainingFault

    if isinstance(err, (TrainingFault, ValueError)) and not isinstance(err, (json.JSONDecodeError, UnicodeError)):
        return None
    if isinstance(err, OSError):
        return SetupError(describe_os_error(err, cfg))
    if isinstance(err, (json.JSONDecodeError, UnicodeError)) or type(err).__name__ == "SafetensorError":
        return SetupError(f"a file could not be decoded during start-up ({type(err).__name__}: {_first_line(err)}); "
                          f"check the files the config names (set {FULL_ERROR_ENV}=1 for the traceback)")
    return None


def error_line(err: BaseException, cfg: Optional[Config] = None) -> Tuple[str, int]:
    """(the one ``longtrain: error:`` line, the exit code) of an error that ends the CLI: 2 for a
    configuration, data or path error, 1 for a fault during training or an unexpected error."""
    from longtrain.trainer.faults import TrainingFault

    converted = setup_error(err, cfg)
    if converted is not None:
        err = converted
    if isinstance(err, TrainingFault):
        return f"longtrain: error: {err}", 1
    if isinstance(err, ValueError):
        return "longtrain: error: " + " ".join(line.strip() for line in str(err).strip().splitlines()), 2
    return (f"longtrain: error: {type(err).__name__}: {_first_line(err)} (an unexpected error; "
            f"set {FULL_ERROR_ENV}=1 for the traceback)"), 1


def report_error(line: str, code: int) -> None:
    """Print the error line and, under launch/run.sh, record it for the launcher to show last."""
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{code}\t{line}\n")
        except OSError:
            pass


@contextlib.contextmanager
def error_boundary(get_cfg=lambda: None):
    """Every exception of the block ends the process with one line and exit code 2 (input) or 1
    (a fault or an unexpected error); ``LONGTRAIN_FULL_ERROR=1`` lets it raise instead."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - the one place errors become the CLI's one line
        if os.environ.get(FULL_ERROR_ENV) == "1":
            raise
        line, code = error_line(err, get_cfg())
        report_error(line, code)
        sys.exit(code)


def _one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf composition error as one line naming the key (their own text spans several)."""
    while err.__cause__ is not None and not getattr(err, "full_key", None):
        err = err.__cause__
    text = _first_line(err)
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
        text = _first_line(err)
        return (f"{key.lstrip('+~')}: cannot parse the override '{override}' ({text}); check its brackets and "
                "quotes: a list is key=[a,b], a value with special characters is quoted, key='...'")
    return None


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_dir_problem(key: str, value: str) -> Optional[str]:
    """Why the directory ``value`` (config key ``key``) cannot be used or created for writing, or None.

    Only looks: nothing is created.
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
    return None


def check_paths(cfg: Config) -> None:
    """The paths of a plain run, checked before anything is created: ``run.dir`` and
    ``data.cache_dir`` must be writable directories (or creatable), ``model.hf_path`` a complete
    Hugging Face directory.

    Raises:
        ConfigError: naming the key, the path and the cause.
    """
    for key, value in (("run.dir", cfg.run.dir), ("data.cache_dir", cfg.data.cache_dir or _DEFAULT_CACHE)):
        problem = writable_dir_problem(key, value)
        if problem is not None:
            raise ConfigError(problem)
    if cfg.model.hf_path is not None:
        from longtrain.models.hf import check_hf_dir

        check_hf_dir(cfg.model.hf_path)


def check_model(cfg: Config, world_size: int) -> None:
    """The model geometry (registry entry with the overrides, or ``model.hf_path``'s config.json)
    and its fit to the sequence-parallel layout, without building the model."""
    from longtrain.parallel.dims import ParallelDims
    from longtrain.trainer.build import build_model_args

    args = build_model_args(cfg.model)
    dims = ParallelDims(world_size=world_size, ulysses=cfg.parallel.sp.ulysses, ring=cfg.parallel.sp.ring)
    dims.validate_model(args.num_heads, args.num_kv_heads)
    dims.validate_seq_len(cfg.data.seq_len)


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


def precheck(argv: List[str]) -> Optional[str]:
    """Compose and validate the config the command line asks for; the one-line error, or None.

    Plain runs (``--config-name``/``--config-dir`` and overrides) and every job of a
    ``--multirun`` sweep are checked here so that every bad key or value is reported in one line
    before any work: the overrides' form, the schema checks, the layout against ``WORLD_SIZE``,
    the model geometry and, for a plain run, the paths (:func:`check_paths`). Nothing is created.
    Other Hydra modes (``--cfg``, ``--help``, ...) are left to Hydra.
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
        world = os.environ.get("WORLD_SIZE", "1")
        if not world.isdigit() or int(world) < 1:
            return f"WORLD_SIZE: must be a positive whole number (torchrun sets it), got {world!r}; unset it to run alone"
        world_size = int(world)
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            for job in jobs or []:
                cfg = to_config(compose(config_name=name, overrides=job))
                check_layout(cfg, world_size)
                if not multirun:  # under --multirun only the sweep's name starts with run.dir
                    check_paths(cfg)
                check_model(cfg, world_size)
    except MissingConfigException:
        recipes = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
        return f"unknown recipe '{name}' in {config_dir}; choose one of: {', '.join(recipes)}"
    except Exception as err:  # noqa: BLE001 - every composition error becomes one line
        if isinstance(err, ValueError) and not hasattr(err, "full_key"):
            return " ".join(line.strip() for line in str(err).strip().splitlines())
        return _one_line(err)
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
        with error_boundary():
            error = precheck(argv)
            if error is not None:
                report_error(f"longtrain: error: {error}", 2)
                return 2
            if check_only:
                return 0
            saved = sys.argv
            sys.argv = [saved[0] if saved else "longtrain.train", *argv]
            try:
                _hydra_main()
            finally:
                sys.argv = saved
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return 0


def main() -> None:
    """Console-script entry point (``longtrain-train``)."""
    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
