"""The error boundary of the command line: whatever is raised ends as one ``longtrain: error:`` line.

:func:`error_boundary` wraps everything the CLI and each rank do; :func:`error_line` turns an
exception into the line and the exit code (2: a configuration, data or path error; 1: a fault during
training, or an unexpected error). A file-system refusal or an undecodable file during start-up
becomes a :class:`SetupError` naming the config key its path came from (:func:`setup_error`).
``LONGTRAIN_FULL_ERROR=1`` lets errors raise with their traceback.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from typing import List, Optional, Tuple

from longtrain.config import Config, ConfigError

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
DEFAULT_CACHE = "~/.cache/longtrain"


def _path_keys(cfg: Optional[Config]) -> List[tuple]:
    """(config key, absolute path) of every path the config names."""
    if cfg is None:
        return []
    pairs = [("run.dir", cfg.run.dir), ("data.cache_dir", cfg.data.cache_dir or DEFAULT_CACHE),
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


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe_os_error(err: OSError, cfg: Optional[Config] = None, key: Optional[str] = None) -> str:
    """An ``OSError`` as ``<key>: cannot use '<path>': <cause>; <fix>``."""
    filename = err.filename if err.filename is not None else err.filename2
    key = key or (key_of_path(cfg, filename) if filename is not None else None)
    cause, fix = _OS_CAUSES.get(err.errno, (err.strerror or first_line(err), "check the path"))
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
        return SetupError(f"a file could not be decoded during start-up ({type(err).__name__}: {first_line(err)}); "
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
    return (f"longtrain: error: {type(err).__name__}: {first_line(err)} (an unexpected error; "
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
