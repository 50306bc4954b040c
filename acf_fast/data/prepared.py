"""The folder `prepare` writes, and the one class that reads it.

    dataset.json                 the manifest: sizes, counts, the source files, file names
    naive-user-train.csv         training triplets        (docs/formats.md#prepared-folder)
    naive-user-validation.csv    validation triplets
    naive-user-evaluation.csv    held-out baskets for evaluation
    history.npz                  each user's training and consumed items

Everything that needs one of these files asks a `PreparedDataset` for it, so the
manifest's layout is known in this module only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .formats import EvaluationGroups, TripletSet, read_evaluation, read_triplets
from .history import UserHistory

TRAIN_FILE = "naive-user-train.csv"
VALIDATION_FILE = "naive-user-validation.csv"
EVALUATION_FILE = "naive-user-evaluation.csv"
HISTORY_FILE = "history.npz"
MANIFEST_FILE = "dataset.json"
FILES = {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "evaluation": EVALUATION_FILE,
         "history": HISTORY_FILE}


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
            raise FileNotFoundError(f"{path} not found: run `acf-fast prepare` into {self.folder} first")
        try:
            self.manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a valid manifest ({exc}); run `acf-fast prepare` "
                             f"into {self.folder} again") from None
        self.manifest["dir"] = str(self.folder)

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
        counts, seed, source files), without the folder it happens to sit in."""
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

    def triplets(self, role: str, max_profile_size: int) -> TripletSet:
        return read_triplets(self.path(role), max_profile_size, n_users=self.n_users,
                             n_items=self.n_items)

    def evaluation(self) -> EvaluationGroups:
        return read_evaluation(self.path("evaluation"), n_users=self.n_users, n_items=self.n_items)

    def history(self) -> UserHistory:
        return UserHistory.load(self.path("history"))

