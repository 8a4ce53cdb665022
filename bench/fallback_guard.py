"""pytest plugin for the GPU suite's test stage: fail any test whose fused block kernels fell back
to the reference kernels, and name it.

Loaded with ``-p fallback_guard`` (``bench/`` on ``PYTHONPATH``). It counts the calls of the
reference kernels made *by* :mod:`longtrain.kernels.fused` (the fallbacks; tests that call the
reference directly are not counted), turns a passing test with a fallback into a failure, and,
when ``LONGTRAIN_FALLBACK_REPORT`` names a file, writes ``{test id: fallbacks}`` there as JSON.
"""
from __future__ import annotations

import json
import os

import pytest

_COUNT = {"n": 0}
_BY_TEST: dict = {}


def _counting(fn):
    def wrapper(*args, **kwargs):
        _COUNT["n"] += 1
        return fn(*args, **kwargs)
    wrapper.__wrapped__ = fn
    return wrapper


def pytest_configure(config):
    from longtrain.kernels import fused

    if not hasattr(fused.reference_block_forward, "__wrapped__"):
        fused.reference_block_forward = _counting(fused.reference_block_forward)
        fused.reference_block_backward = _counting(fused.reference_block_backward)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    before = _COUNT["n"]
    yield
    item._fallbacks = _COUNT["n"] - before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    fallbacks = getattr(item, "_fallbacks", 0)
    if report.when == "call" and fallbacks:
        _BY_TEST[item.nodeid] = fallbacks
        if report.passed:
            report.outcome = "failed"
            report.longrepr = (f"FALLBACK: {fallbacks} block kernel call(s) of {item.nodeid} fell back to the "
                               "reference kernels (longtrain.kernels.fused)")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LONGTRAIN_FALLBACK_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_BY_TEST, f, indent=1)
