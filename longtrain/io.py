"""Generic file I/O (placeholder while the I/O helpers move here)."""
from longtrain.trainer.checkpoint import load_model, load_torch, save_model, save_torch  # noqa: F401
