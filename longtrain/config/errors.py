"""The error every schema check raises, and the one-line check that raises it."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def require(ok: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("<key>: <msg>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")
