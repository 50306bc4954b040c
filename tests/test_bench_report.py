"""The benchmark table as a user reads it (issue 18, item 3), rendered from made-up rows:
nothing is timed, so its format is checked in milliseconds by `make test`.

One end-to-end run checks that `pytest --benchmark` prints that table and not
pytest-benchmark's own.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = _load("report")
Row = report.Row

ROWS = [
    Row("train step fp32 B=128", "cpu", 0.160, 60 * 2**20, {}, others=0.1),
    Row("train step fp32 B=128", "reference", 0.480, 700 * 2**20, {}, others=0.2),
    Row("train step fp32 B=128", "cpu+compile", 0.150, None, {}, others=0.1),
    Row("recommend_all fp32 1000u x 33000", "reference", 5.0, None,
        {"timed": "40users_scaled"}, others=0.0),
    Row("recommend_all fp32 1000u x 33000", "cpu", 2.0, None, {"blocks": 250}, others=0.0),
]


def probe(start=0.1, end=2.1, others=0.05):
    return SimpleNamespace(start_load=start, end_load=end, others=others)


def render(rows=ROWS, **load):
    return report.render(rows, "Some CPU, 2 cores; torch 9.9, 2 threads", probe(**load), 2)


def table_rows(text):
    """The table's own lines: between the column header and the blank line before the legend."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("group "))
    return lines[start], lines[start + 1:lines.index("", start)]


def test_header_names_the_machine_and_its_load():
    text = render()
    assert text.splitlines()[0] == "machine: Some CPU, 2 cores; torch 9.9, 2 threads"
    assert "load average 0.10 at the start, 2.10 at the end" in text
    assert "kept 0.05 of 2 cores busy" in text
    assert "LOADED" not in text


@pytest.mark.parametrize("load, marked", [
    (dict(start=1.5), 0),                  # busy before the run began
    (dict(others=1.2), 0),                 # busy on average during it
    ({}, 1),                               # one row measured while others were busy
])
def test_a_loaded_run_is_flagged_loudly(load, marked):
    rows = list(ROWS)
    if marked:
        rows[0] = Row(**{**rows[0].__dict__, "others": 1.4})
    text = render(rows, **load)
    assert re.search(rf"^LOADED: .*\({marked} of 5 rows marked !\): ratios unreliable", text, re.M)
    _, body = table_rows(text)
    assert sum("!" in line for line in body) == marked


def cells(header, line):
    """(group, [backend, median, vs ref, peak MB, others, notes...]), cut where the header
    puts the backend column: the rows must line up with it."""
    at = header.index("backend")
    return line[:at].strip(), line[at:].split()


def test_every_row_is_a_ratio_to_its_groups_reference_which_comes_first():
    header, body = table_rows(render())
    assert header.split()[:2] == ["group", "backend"] and "vs ref" in header
    rows = [cells(header, line) for line in body]
    train = [c for g, c in rows if g == "train step fp32 B=128"]
    assert [c[:3] for c in train] == [["reference", "480.00ms", "1.00x"],
                                      ["cpu", "160.00ms", "3.00x"],
                                      ["cpu+compile", "150.00ms", "3.20x"]]
    assert [c[3] for c in train] == ["700.0", "60.0", "-"]
    rec = [c for g, c in rows if g == "recommend_all fp32 1000u x 33000"]
    assert [c[:3] for c in rec] == [["reference", "5000.00ms", "1.00x"],
                                    ["cpu", "2000.00ms", "2.50x"]]
    assert rec[0][5:] == ["timed=40users_scaled"] and rec[1][5:] == ["blocks=250"]
    # the median column ends where its header does
    col = header.index("median") + len("median")
    assert all(line[col - 2:col] == "ms" for line in body)


def test_a_group_without_its_reference_says_so():
    rows = ROWS + [Row("peak memory bf16 B=128", "cpu", 0.3, 80 * 2**20, {})]
    text = render(rows)
    _, body = table_rows(text)
    assert "no ref" in next(line for line in body if line.startswith("peak memory"))
    assert 'NO REFERENCE ROW in group "peak memory bf16 B=128"' in " ".join(text.split())


def test_every_note_and_column_is_explained_in_the_legend():
    text = render(ROWS + [Row("g", "reference", 1.0, None, {"mystery": 3})])
    legend = " ".join(text[text.index("\nlegend:"):].split())
    assert "timed=40users_scaled: the reference scores one user per call" in legend
    assert "only 40 users were timed and the time was scaled up" in legend
    assert "blocks=250: users per recommend_batch call (250 at a time" in legend
    assert "mystery=3: NO EXPLANATION" in legend
    header, _ = table_rows(text)
    for column in ("median", "vs ref", "peak MB", "others"):
        assert column in header and f" {column}: " in legend
    assert all(len(line) <= report.WIDTH for line in text[text.index("\nlegend:"):].splitlines())


def _recorded_notes():
    """(key, example value) of every note the benchmark files pass to harness.record;
    an f-string's fields are filled with 7."""
    found = []
    for path in sorted(BENCH.glob("test_bench_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "record":
                for kw in node.keywords:
                    if kw.arg in (None, "benchmark", "seconds", "peak_bytes"):
                        continue
                    if isinstance(kw.value, ast.JoinedStr):
                        value = "".join(v.value if isinstance(v, ast.Constant) else "7"
                                        for v in kw.value.values)
                    else:
                        value = ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "7"
                    found.append((path.name, kw.arg, str(value)))
    return found


def test_every_note_the_benchmarks_record_has_an_explanation():
    notes = _recorded_notes()
    assert {k for _, k, _ in notes} >= {"timed", "blocks"}   # the scan finds them
    for name, key, value in notes:
        assert report.explain_note(key, value) is not None, (name, key, value)


def test_load_from_proc_stat_counts_other_processes_only():
    # 2 s apart: the machine spent 3 busy CPU seconds, this process tree 1 of them
    assert report.LoadProbe._others((0.0, 10.0, 4.0), (2.0, 13.0, 5.0)) == pytest.approx(1.0)
    assert report.LoadProbe._others((0.0, None, 4.0), (2.0, 13.0, 5.0)) is None
    live = report.LoadProbe()
    assert live.start_load >= 0 and live.end_load is None
    live.finish()
    assert live.end_load >= 0 and (live.others is None or live.others >= 0)


BENCH_FILE = """
import harness

def test_tiny(benchmark):
    benchmark.pedantic(lambda: sum(range(100)), rounds=3, iterations=1)
    harness.record("tiny", "reference", benchmark)
    harness.record("tiny", "other", seconds=benchmark.stats.stats.median / 2, blocks=250)
"""


def test_pytest_benchmark_prints_our_table_only(tmp_path):
    """benchmarks/conftest.py loaded as a plugin (-p), as under `pytest benchmarks/`."""
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_tiny.py").write_text(BENCH_FILE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), str(BENCH.parent)]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "--benchmark", "-q",
                           "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_tiny.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "acf_fast benchmarks: same-run ratios" in out and "machine: " in out
    assert re.search(r"^tiny\s+other\s.*2\.00x", out, re.M)
    assert "Name (time in" not in out and "OPS" not in out   # pytest-benchmark's table
