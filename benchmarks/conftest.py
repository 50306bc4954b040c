"""Benchmarks run only with `pytest benchmarks/ --benchmark`; `make test` skips them.

Each benchmark records its median in harness.ROWS; the session ends with one table
(benchmarks/report.py): every backend's time as a ratio to its group's reference
measured in the same run, the machine and its load in the header, and a legend.
pytest-benchmark only times the calls: its own table, whose ratios are to the fastest
test of a group rather than to the reference, is turned off (its quiet mode).
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
import report  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the acf_fast benchmarks in benchmarks/")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # before pytest-benchmark's own pytest_configure reads the option into its session
    if config.getoption("--benchmark") and hasattr(config.option, "benchmark_quiet"):
        config.option.benchmark_quiet = True


def pytest_sessionstart(session):
    if session.config.getoption("--benchmark"):
        harness.PROBE = report.LoadProbe()


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
        text = harness.table()
        terminalreporter.section("acf_fast benchmarks: same-run ratios to each group's reference")
        terminalreporter.write_line(text)
        out = os.environ.get("ACF_BENCH_TABLE")
        if out:
            with open(out, "w") as fh:
                fh.write(text + "\n")
