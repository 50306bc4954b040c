"""Benchmarks run only with `pytest benchmarks/ --benchmark`; `make test` skips them.

Each benchmark records its median in harness.ROWS; the session ends with one table of
every backend's time as a ratio to the eager reference measured in the same run.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the acf_fast benchmarks in benchmarks/")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if harness.ROWS:
        terminalreporter.section("acf_fast: same-run ratios to the eager reference")
        terminalreporter.write_line(harness.table())
        out = os.environ.get("ACF_BENCH_TABLE")
        if out:
            with open(out, "w") as fh:
                fh.write(harness.table() + "\n")
