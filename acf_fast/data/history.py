"""Per-user item histories (training items in order, everything consumed) as CSR arrays.

`prepare` saves one next to the triplet files (`history.npz`) so evaluation's
standard protocol, `recommend` and `explain` know what each user consumed without
re-reading the interactions. Item ids here are the model's, 1-based.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARRAYS = ("n_users", "n_items", "train_ptr", "train_items", "consumed_ptr", "consumed_items")


@dataclass
class UserHistory:
    n_users: int
    n_items: int
    train_ptr: np.ndarray      # [U+1]
    train_items: np.ndarray    # chronological training items, 1-based
    consumed_ptr: np.ndarray   # [U+1]
    consumed_items: np.ndarray # every item the user interacted with (train + held out), 1-based

    def train_of(self, user: int) -> np.ndarray:
        self._check_user(user)
        return self.train_items[self.train_ptr[user]:self.train_ptr[user + 1]]

    def consumed_of(self, user: int) -> np.ndarray:
        self._check_user(user)
        return self.consumed_items[self.consumed_ptr[user]:self.consumed_ptr[user + 1]]

    def _check_user(self, user: int) -> None:
        if not 0 <= int(user) < self.n_users:
            raise ValueError(f"unknown user id {user}; expected ids in [0, {self.n_users - 1}]")

    def check_users(self, users) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        bad = users[(users < 0) | (users >= self.n_users)]
        if bad.size:
            raise ValueError(f"unknown user id {int(bad[0])}; expected ids in [0, {self.n_users - 1}]")
        return users

    def last_profiles(self, users, width: int) -> np.ndarray:
        """[B, width]: each user's most recent `width` training items, oldest first, 0-padded."""
        users = self.check_users(users)
        start, end = self.train_ptr[users], self.train_ptr[users + 1]
        keep = np.minimum(end - start, width)
        cols = np.arange(width)
        valid = cols[None, :] < keep[:, None]
        out = np.zeros((users.size, width), dtype=np.int64)
        out[valid] = self.train_items[((end - keep)[:, None] + cols[None, :])[valid]]
        return out

    def padded(self, users, which: str = "train") -> np.ndarray:
        """[B, max length] of a block of users' train or consumed items, 0-padded."""
        users = self.check_users(users)
        ptr, items = ((self.train_ptr, self.train_items) if which == "train"
                      else (self.consumed_ptr, self.consumed_items))
        start, end = ptr[users], ptr[users + 1]
        length = end - start
        width = max(int(length.max()) if users.size else 0, 1)
        cols = np.arange(width)
        valid = cols[None, :] < length[:, None]
        out = np.zeros((users.size, width), dtype=np.int64)
        out[valid] = items[(start[:, None] + cols[None, :])[valid]]
        return out

    def save(self, path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, n_users=self.n_users, n_items=self.n_items, train_ptr=self.train_ptr,
                 train_items=self.train_items, consumed_ptr=self.consumed_ptr,
                 consumed_items=self.consumed_items)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "UserHistory":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"user history not found: {path} (written by `acf-fast prepare`)")
        return cls.from_bytes(path.read_bytes(), path)

    @classmethod
    def from_bytes(cls, data: bytes, path) -> "UserHistory":
        """The history in `data` (the bytes of `path`); a truncated or damaged file is one
        ValueError naming it, not a BadZipFile or KeyError from inside numpy."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                missing = [k for k in ARRAYS if k not in z.files]
                if missing:
                    raise ValueError(f"it lacks {missing}")
                h = cls(int(z["n_users"]), int(z["n_items"]), z["train_ptr"], z["train_items"],
                        z["consumed_ptr"], z["consumed_items"])
            for name in ("train", "consumed"):
                ptr, items = getattr(h, f"{name}_ptr"), getattr(h, f"{name}_items")
                if ptr.shape != (h.n_users + 1,) or int(ptr[-1]) != items.size or np.any(np.diff(ptr) < 0):
                    raise ValueError(f"its {name}_ptr does not fit {h.n_users} users and "
                                     f"{items.size} items")
        except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable user history ({exc}): it is truncated or "
                             "damaged; run `acf-fast prepare` again") from None
        return h
