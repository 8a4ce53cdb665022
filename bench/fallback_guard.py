"""pytest plugin for the GPU suite's test stage: fail any test whose attention blocks fell back to
the reference kernels although a fused executor takes their dtype, and name it.

Loaded with ``-p fallback_guard`` (``bench/`` on ``PYTHONPATH``). It counts the blocks that
:class:`longtrain.kernels.dispatch.AttentionKernels` routes to ``fallback`` (a fused executor takes
the inputs' device and dtype, but the block has no segment plan). Blocks routed to ``reference``
because no fused executor exists for them (fp32 on CUDA, an odd head size) are by design and not
counted, nor are tests that call the reference kernels directly. A passing test with a fallback
becomes a failure; when ``LONGTRAIN_FALLBACK_REPORT`` names a file, ``{test id: fallbacks}`` is
written there as JSON.
"""
from __future__ import annotations

import json
import os

import pytest

_COUNT = {"n": 0}
_BY_TEST: dict = {}


def _counting(route):
    def wrapper(*args, **kwargs):
        res = route(*args, **kwargs)
        if res.path == "fallback":
            _COUNT["n"] += 1
        return res
    wrapper.__wrapped__ = route
    return wrapper


def pytest_configure(config):
    from longtrain.kernels.dispatch import AttentionKernels

    if not hasattr(AttentionKernels.route, "__wrapped__"):
        AttentionKernels.route = _counting(AttentionKernels.route)


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
            report.longrepr = (f"FALLBACK: {fallbacks} attention block(s) of {item.nodeid} fell back to the "
                               "reference kernels (longtrain.kernels.dispatch)")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("LONGTRAIN_FALLBACK_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_BY_TEST, f, indent=1)
