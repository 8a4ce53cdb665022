"""A checkpoint with code planted in one of its state files, as an attacker would plant it: an object
whose ``__reduce__`` runs a shell command (creating a marker file) when unpickled, added to the
file's content, and the file's size and sha256 updated in the manifest so that the integrity check
passes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


class Payload:
    """Unpickled, runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant(checkpoint: Path, rel: str, marker: Path) -> Path:
    """Add a :class:`Payload` to the state file ``checkpoint/rel`` (created, as a dict, when absent)
    and make the manifest match; returns the file."""
    path = Path(checkpoint) / rel
    state = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else {}  # our own file
    if not isinstance(state, dict):
        state = {"state": state}
    state["planted"] = Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    manifest_file = Path(checkpoint) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    entry = {"path": rel, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest["files"] = [e for e in manifest["files"] if e["path"] != rel] + [entry]
    manifest_file.write_text(json.dumps(manifest, indent=1))
    return path
