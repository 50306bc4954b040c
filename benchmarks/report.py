"""The one table `pytest benchmarks/ --benchmark` prints: every row a ratio to its group's
reference measured in the same run, the machine and its load in the header, a loaded run
flagged, and a legend for every column and note.

Standard library only (no torch), so tests/test_bench_report.py renders it in
milliseconds without running a benchmark.
"""

from __future__ import annotations

import os
import re
import textwrap
import time
from dataclasses import dataclass, field

BASELINE = "reference"
# Other processes keeping more than this share of the cores busy make wall-clock ratios
# unreliable: on the 2-core machines this project runs on, one busy core already halves
# what a 2-thread GEMM gets, and not equally for the rows being compared.
LOADED_PER_CORE = 0.5
WIDTH = 100   # header and legend lines are wrapped to this; table rows are as wide as they need


@dataclass
class Row:
    group: str       # rows compared with each other, e.g. "train step fp32 B=128"
    name: str        # backend label, e.g. "reference", "reference+compile", "cpu"
    seconds: float   # median seconds per call
    peak_bytes: int | None = None
    extra: dict = field(default_factory=dict)
    others: float | None = None   # cores other processes kept busy while it was measured


# note key -> (pattern of its value, explanation; {0}, {1}.. are the pattern's groups).
# Every note a benchmark records needs an entry (tests/test_bench_report.py checks it).
NOTES = {
    "timed": [
        (r"(\d+)users_scaled", "the reference scores one user per call, as the tutorial "
                               "does; only {0} users were timed and the time was scaled up "
                               "to the group's user count"),
        (r"1step", "a single step, timed while its peak memory was measured (not a median; "
                   "the group is about memory)"),
    ],
    "blocks": [
        (r"(\d+)", "users per recommend_batch call ({0} at a time, as "
                   "acf_fast.evaluation.evaluate blocks them)"),
    ],
    "gemm": [
        (r"([\w-]+)/([\w-]+)", "the cpu backend's GEMM kinds, chosen by measurement on this "
                                "machine (acf_fast.backends.gemm_choice): {0} for the reduction, "
                                "{1} for W_red's gradient"),
    ],
}

COLUMNS = [
    ("median", "median wall-clock time of one call over the rounds (after warm-up and "
               "compilation); in a \"1 thread cpu-time\" group: the least process CPU time "
               "of one call on one thread, which other jobs barely move"),
    ("vs ref", "the group's reference time / this row's time, both from this run: above "
               "1.00x is faster than the reference"),
    ("peak MB", "memory one warmed-up call adds (CPU: resident-set high-water mark; CUDA: "
                "max_memory_allocated); - = not measured"),
    ("others", "cores that other processes kept busy while the row's test ran (from "
               "/proc/stat, less this run's own CPU time); ! = above "
               f"{LOADED_PER_CORE} per core"),
]

BACKEND_NAMES = ("reference: the tutorial's module code, eager; +compile: the same model "
                 "under torch.compile; cpu: the native CPU backend; triton: the Triton backend")


def explain_note(key: str, value) -> str | None:
    for pattern, text in NOTES.get(key, ()):
        match = re.fullmatch(pattern, str(value))
        if match:
            return text.format(*match.groups())
    return None


# ---------------------------------------------------------------- machine load
def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    # guest time is already counted in user and nice
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and its descendants (live ones read from /proc, for
    compile workers that are still running)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    tick = os.sysconf("SC_CLK_TCK")
    parents, me = {}, os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return total
    stats = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[pid] = int(rest[1])
        stats[pid] = (int(rest[11]) + int(rest[12])) / tick   # utime + stime
    for pid, secs in stats.items():
        p = parents.get(pid)
        while p and p != me:
            p = parents.get(p)
        if p == me and pid != me:
            total += secs
    return total


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LoadProbe:
    """How busy other processes keep the machine: the 1-minute load average at the start
    and end (the end one counts this run's own threads too), and the cores other
    processes kept busy, from /proc/stat less this process tree's own CPU time."""

    def __init__(self):
        self.start_load = os.getloadavg()[0]
        self.end_load: float | None = None
        self._first = self._last = self._sample()
        self.others: float | None = None

    @staticmethod
    def _sample():
        return time.monotonic(), _busy_seconds(), _own_seconds()

    @staticmethod
    def _others(a, b) -> float | None:
        (t0, busy0, own0), (t1, busy1, own1) = a, b
        if busy0 is None or busy1 is None or t1 - t0 < 0.1:
            return None
        return max((busy1 - busy0) - (own1 - own0), 0.0) / (t1 - t0)

    def since_last(self) -> float | None:
        """Cores other processes kept busy since the previous call (or the start)."""
        now = self._sample()
        others, self._last = self._others(self._last, now), now
        return others

    def finish(self) -> None:
        self.end_load = os.getloadavg()[0]
        self.others = self._others(self._first, self._sample())


# ---------------------------------------------------------------- the table
def _fmt_others(others: float | None, n_cores: int) -> str:
    if others is None:
        return "-"
    return f"{others:.2f}" + ("!" if others > LOADED_PER_CORE * n_cores else "")


def loaded(probe: LoadProbe, n_cores: int) -> bool:
    """Other work above the limit when the run started, or on average during it."""
    limit = LOADED_PER_CORE * n_cores
    return probe.start_load > limit or (probe.others or 0.0) > limit


def render(rows: list[Row], machine: str, probe: LoadProbe, n_cores: int) -> str:
    """The table, its header (machine, load, a LOADED flag) and its legend."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    gw = max([len("group")] + [len(g) for g in groups])
    nw = max([len("backend")] + [len(r.name) for r in rows])
    limit = LOADED_PER_CORE * n_cores
    end = "-" if probe.end_load is None else f"{probe.end_load:.2f}"
    others = "-" if probe.others is None else f"{probe.others:.2f}"
    lines = [f"machine: {machine}"]
    lines += _wrap(f"load: 1-minute load average {probe.start_load:.2f} at the start, {end} at "
                   f"the end (that one counts this run's own threads); other processes kept "
                   f"{others} of {n_cores} cores busy on average during the run")
    busy_rows = [r for r in rows if r.others is not None and r.others > limit]
    if loaded(probe, n_cores) or busy_rows:
        lines += _wrap(f"LOADED: other work above {LOADED_PER_CORE} per core ({len(busy_rows)} "
                       f"of {len(rows)} rows marked !): ratios unreliable, rerun on an idle "
                       "machine (the \"1 thread cpu-time\" groups are the steadiest)")
    lines.append(f"{'group':{gw}s}  {'backend':{nw}s}  {'median':>10s}  {'vs ref':>7s}  "
                 f"{'peak MB':>8s}  {'others':>6s}  notes")
    unexplained, missing = set(), []
    for g, members in groups.items():
        base = next((r for r in members if r.name == BASELINE), None)
        if base is None:
            missing.append(g)
        # the reference first: the row every ratio of the group is read against
        for r in sorted(members, key=lambda r: r.name != BASELINE):
            ratio = f"{base.seconds / r.seconds:6.2f}x" if base else "no ref"
            peak = f"{r.peak_bytes / 2**20:8.1f}" if r.peak_bytes is not None else "-"
            notes = []
            for k, v in r.extra.items():
                note = f"{k}={v}"
                if explain_note(k, v) is None:
                    unexplained.add(note)
                notes.append(note)
            lines.append(f"{g:{gw}s}  {r.name:{nw}s}  {r.seconds * 1e3:8.2f}ms  {ratio:>7s}  "
                         f"{peak:>8s}  {_fmt_others(r.others, n_cores):>6s}  "
                         f"{' '.join(notes)}".rstrip())
    legend = [f"{name}: {text}" for name, text in COLUMNS] + [f"backends: {BACKEND_NAMES}"]
    for k, v in sorted({(k, str(v)) for r in rows for k, v in r.extra.items()}):
        text = explain_note(k, v)
        if text is not None:
            legend.append(f"{k}={v}: {text}")
    legend += [f"{note}: NO EXPLANATION (add it to NOTES in benchmarks/report.py)"
               for note in sorted(unexplained)]
    legend += [f"NO REFERENCE ROW in group \"{g}\": run the whole of benchmarks/ (the train-step "
               "groups' reference rows come from test_bench_reference.py)" for g in missing]
    lines += ["", "legend:"]
    for entry in legend:
        lines += _wrap(entry, indent="  ")
    return "\n".join(lines)


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "    ")
