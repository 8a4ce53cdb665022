"""Puts tests/ on sys.path, so test modules in tests/unit/ and tests/distributed/ (and the processes
the harness spawns for them) import the shared ``support`` package."""
import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
