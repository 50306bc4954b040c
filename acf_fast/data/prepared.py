"""The folder `prepare` writes, and the one class that reads it.

    dataset.json                 the manifest: sizes, counts, the source files, file names
    naive-user-train.csv         training triplets        (docs/formats.md#prepared-folder)
    naive-user-validation.csv    validation triplets
    naive-user-evaluation.csv    held-out baskets for evaluation
    history.npz                  each user's training and consumed items

Everything that needs one of these files asks a `PreparedDataset` for it, so the
manifest's layout is known in this module only.

The folder is written whole or not at all (acf_fast.utils.atomic_folder), and the manifest
records each file's rows, size and sha256 (`checks`). A `PreparedDataset` checks a file
against them the first time it reads it (one extra pass over a file the reader is about to
read anyway: 0.26 s for a 480 MB, 10M-triplet train CSV, under 2 % of parsing it), so a
truncated, edited or swapped file is one ValueError naming it, never data trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path

from ..utils.atomic_folder import leftovers
from .formats import EvaluationGroups, TripletSet, read_evaluation, read_triplets
from .history import UserHistory

TRAIN_FILE = "naive-user-train.csv"
VALIDATION_FILE = "naive-user-validation.csv"
EVALUATION_FILE = "naive-user-evaluation.csv"
HISTORY_FILE = "history.npz"
MANIFEST_FILE = "dataset.json"
FILES = {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "evaluation": EVALUATION_FILE,
         "history": HISTORY_FILE}
CHECKS = "checks"            # manifest key: {role: {"rows", "bytes", "sha256"}}
OVERWRITE_HINT = "--overwrite (overwrite=True)"


def sha256_file(path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(block):
            h.update(data)
    return h.hexdigest()


def file_checks(folder, rows: dict[str, int]) -> dict:
    """The manifest's `checks`: rows, bytes and sha256 of each file `prepare` wrote into folder."""
    folder = Path(folder)
    return {role: {"rows": int(rows[role]), "bytes": (folder / name).stat().st_size,
                   "sha256": sha256_file(folder / name)} for role, name in FILES.items()}


def is_prepared_folder(path) -> bool:
    """What `prepare --overwrite` may replace: a folder holding only files `prepare` writes
    (and the temporary files of an interrupted older prepare), so a folder of other files,
    or one a run was put into, is never deleted."""
    names = set(FILES.values()) | {MANIFEST_FILE}
    temp = re.compile(r"^\.(.+?)\.tmp.*$")
    for entry in Path(path).iterdir():
        m = temp.match(entry.name)
        if not entry.is_file() or (entry.name not in names and not (m and m.group(1) in names)):
            return False
    return True


def write_manifest(folder, manifest: dict) -> None:
    """dataset.json, written last and atomically: a folder with a manifest is complete."""
    out = Path(folder)
    tmp = out / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / MANIFEST_FILE)


class PreparedDataset:
    """A prepared folder: its manifest, and its files by role ("train", "validation",
    "evaluation", "history")."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / MANIFEST_FILE
        if not path.exists():
            old = [p for kind, _, p in leftovers(self.folder) if kind == "old"]
            hint = (f" (an interrupted `prepare --overwrite` left the previous dataset in {old[0]}; "
                    "the next prepare into this folder puts it back first)") if old else ""
            raise FileNotFoundError(f"{path} not found: run `acf-fast prepare` into {self.folder} "
                                    f"first{hint}")
        try:
            self.manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a valid manifest ({exc}); run `acf-fast prepare` "
                             f"into {self.folder} again") from None
        if not isinstance(self.manifest, dict) or not {"n_users", "n_items"} <= set(self.manifest):
            raise ValueError(f"{path} is not a prepared-data manifest (no n_users / n_items); "
                             f"run `acf-fast prepare` into {self.folder} again")
        self.manifest["dir"] = str(self.folder)
        self._verified: set[str] = set()

    @property
    def n_users(self) -> int:
        return int(self.manifest["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def fingerprint(self) -> str:
        """Identifies this prepared dataset: checkpoints record it, and resuming, evaluating
        or recommending on another dataset is refused. A hash of the manifest (sizes, row
        counts, seed, source files, and each file's sha256), without the folder it happens to
        sit in: two prepares of the same inputs with the same settings share it, any other
        content does not."""
        content = {k: v for k, v in self.manifest.items() if k != "dir"}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def features(self, override=None) -> str:
        """The feature file: `override` when given, else the one `prepare` used."""
        return str(override) if override else self.manifest["features"]

    def path(self, role: str) -> Path:
        files = self.manifest.get("files", FILES)
        if role not in files:
            raise ValueError(f"{self.folder / MANIFEST_FILE} names no {role!r} file; "
                             "run `acf-fast prepare` again")
        return self.folder / files[role]

    def has_validation(self) -> bool:
        return bool(self.manifest.get("n_validation_triplets", 1))

    def check(self, role: str, data: bytes | None = None) -> None:
        """Refuse a file that is not the one `prepare` recorded (size, then sha256 of the file
        or of `data`, its bytes already read); each role is hashed once per PreparedDataset."""
        if role in self._verified:
            return
        path, manifest = self.path(role), self.folder / MANIFEST_FILE
        checks = self.manifest.get(CHECKS)
        if checks is None:
            print(f"acf_fast: {manifest} records no content hashes (written by an older acf-fast), "
                  f"so {path.name} cannot be checked; run `acf-fast prepare` again to add them",
                  file=sys.stderr)
            self._verified.update(FILES)          # say it once
            return
        want = checks.get(role) if isinstance(checks, dict) else None
        if not isinstance(want, dict) or not {"bytes", "sha256", "rows"} <= set(want):
            raise ValueError(f"{manifest} records no check for its {role!r} file; "
                             f"run `acf-fast prepare` into {self.folder} again")
        if data is None and not path.is_file():
            raise FileNotFoundError(f"{path} not found (listed in {manifest}); "
                                    f"run `acf-fast prepare` into {self.folder} again")
        size = len(data) if data is not None else path.stat().st_size
        if size != want["bytes"]:
            raise self._changed(path, f"it has {size:,} bytes, {manifest.name} records {want['bytes']:,}")
        digest = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
        if digest != want["sha256"]:
            raise self._changed(path, f"its sha256 is not the one {manifest.name} records")
        self._verified.add(role)

    def _changed(self, path: Path, detail: str) -> "FileChanged":
        return FileChanged(f"{path} was truncated or changed after `acf-fast prepare` wrote it "
                           f"({detail}); run `acf-fast prepare` into {self.folder} again "
                           "(with --overwrite)")

    def _read(self, role: str, read, data: bytes | None = None):
        """read() after check(role). A file that fails the check is parsed all the same, so
        the error also says what is wrong inside it (an unknown id, a cut-off line) when the
        reader finds it."""
        try:
            self.check(role, data)
        except FileChanged as changed:
            try:
                read()
            except (ValueError, csv.Error) as exc:
                raise FileChanged(f"{exc}; {changed}") from None
            raise
        return read()

    def triplets(self, role: str, max_profile_size: int) -> TripletSet:
        out = self._read(role, lambda: read_triplets(self.path(role), max_profile_size,
                                                     n_users=self.n_users, n_items=self.n_items))
        want = (self.manifest.get(CHECKS) or {}).get(role)
        if want and int(want["rows"]) != len(out):
            raise self._changed(self.path(role), f"{len(out):,} rows, the manifest records "
                                                 f"{int(want['rows']):,}")
        return out

    def evaluation(self) -> EvaluationGroups:
        return self._read("evaluation", lambda: read_evaluation(
            self.path("evaluation"), n_users=self.n_users, n_items=self.n_items))

    def history(self) -> UserHistory:
        path = self.path("history")
        if not path.is_file():
            return UserHistory.load(path)         # its FileNotFoundError
        data = path.read_bytes()
        return self._read("history", lambda: UserHistory.from_bytes(data, path), data)


class FileChanged(ValueError):
    """A prepared file that is not the one its manifest records."""

