"""The tutorial's CSV formats: interactions, triplets and the evaluation file.

Readers check what they are given and say exactly what is wrong (file, line,
column, value) instead of failing later inside the model. Ids are parsed with
numpy in chunks, never row by row in Python, so ten million triplets read in
seconds and in bounded memory.

Id conventions (docs/formats.md#id-conventions): files hold 0-based item ids; everything returned here
for the model is 1-based (0 is padding). Users are 0..U-1 in files and in memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .csv_io import check_id_range, csv_chunks, open_csv, parse_id_lists, parse_ints, parse_timestamps

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
TRIPLET_COLUMNS = ("profile", "pi", "ni", "ui")
EVALUATION_COLUMNS = ("timestamp", "user_id", "predict", "profile")


# ---------------------------------------------------------------------------- interactions
@dataclass
class Interactions:
    """One row per distinct (user, item): 0-based ids, the latest timestamp kept."""
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return int(self.user.size)

    @property
    def n_users(self) -> int:
        return int(self.user.max()) + 1 if len(self) else 0


def read_interactions(path, n_items: int | None = None) -> Interactions:
    """Read `user_id,item_id,timestamp[,evaluation]`; n_items (from the feature file) bounds item ids.

    Repeated (user, item) pairs keep the latest timestamp (docs/formats.md#interactions-csv).
    """
    fh, reader, col = open_csv(path, INTERACTION_COLUMNS)
    users, items, times = [], [], []
    with fh:
        for first, rows in csv_chunks(reader, path, len(col)):
            users.append(parse_ints([r[col["user_id"]] for r in rows], path, "user_id", first))
            items.append(parse_ints([r[col["item_id"]] for r in rows], path, "item_id", first))
            times.append(parse_timestamps([r[col["timestamp"]] for r in rows], path, first))
    if not users:
        raise ValueError(f"{path}: no interactions after the header")
    user, item = np.concatenate(users), np.concatenate(items)
    timestamp = np.concatenate(times)
    check_id_range(user, None, path, "user_id", "user")
    check_id_range(item, n_items, path, "item_id", "item")
    # keep the latest of repeated (user, item): sort by time, the last occurrence wins
    order = np.lexsort((np.arange(user.size), timestamp, item, user))
    user, item, timestamp = user[order], item[order], timestamp[order]
    last = np.ones(user.size, dtype=bool)
    last[:-1] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
    return Interactions(user[last], item[last], timestamp[last])


def check_user_ids(inter: Interactions, path) -> None:
    """User ids must be dense, 0..U-1 (the user table has max id + 1 rows, and the triplet
    quota is split over all of them): refuse ids of which more than half are never used (an
    outlier or a raw database id would inflate the table, or try to allocate terabytes),
    warn about a few unused ones."""
    if not len(inter):
        return
    top = int(inter.user.max())
    used = int(np.unique(inter.user).size)
    unused = top + 1 - used
    if unused > used:
        raise ValueError(
            f"{path}: user ids are sparse: {used:,} distinct users, but the largest id is {top:,}, "
            f"so the user table would have {top + 1:,} rows ({unused:,} never used) and each "
            f"user's triplet quota would shrink {(top + 1) / used:,.0f}-fold. acf-fast expects dense "
            f"0-based user ids (0..U-1, as in the tutorial's files): remap them first, e.g. with "
            "pandas `df['user_id'], original = pd.factorize(df['user_id'])` (original[i] is the "
            "id user i had, to map recommendations back)")
    if unused:
        print(f"acf_fast prepare: {unused:,} of the user ids 0..{top:,} never occur in {path}; they "
              f"count in the user table but get no triplets, so about {unused / (top + 1):.0%} fewer "
              f"triplets are written than requested (remap the ids to 0..{used - 1:,} to avoid it)",
              file=sys.stderr)


# ---------------------------------------------------------------------------- triplets
@dataclass
class TripletSet:
    """Training triplets as tensors, ready for batching by index.

    user [T], profile [T, P] (1-based item ids, right-padded with 0, pi removed),
    pos [T], neg [T] (1-based).
    """
    user: torch.Tensor
    profile: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor

    def __len__(self) -> int:
        return int(self.user.numel())

    def subset(self, index) -> "TripletSet":
        return TripletSet(self.user[index], self.profile[index], self.pos[index], self.neg[index])


def profiles_to_matrix(flat: np.ndarray, lengths: np.ndarray, width: int,
                       drop_last: bool = False) -> np.ndarray:
    """Ragged lists (flat ids + lengths) -> [R, width], keeping each list's *last* `width`
    entries (the most recent items), left-aligned and right-padded with 0.

    drop_last removes each list's final id first (the tutorial drops pi from its profile).
    Ids are taken as given; shift them before calling.
    """
    ends = np.cumsum(lengths)
    if drop_last:
        ends = ends - (lengths > 0)
        lengths = np.maximum(lengths - 1, 0)
    keep = np.minimum(lengths, width)
    starts = ends - keep
    out = np.zeros((lengths.size, width), dtype=np.int64)
    cols = np.arange(width)
    valid = cols[None, :] < keep[:, None]
    src = (starts[:, None] + cols[None, :])[valid]
    out[valid] = flat[src]
    return out


FAST_BLOCK_BYTES = 64 << 20


def _fast_triplet_blocks(path):
    """Yield (flat int64 tokens, tokens per line) for blocks of a `profile,pi,ni,ui` file.

    Parses with numpy alone: separators are counted on the raw bytes to find where each
    line's tokens end, and all integers of a block are parsed in one call. Yields None
    (the caller falls back to the checked, slower path) at the first irregularity.
    """
    sep_bytes = np.frombuffer(b" ,", dtype=np.uint8)
    with open(path, "rb") as fh:
        if fh.readline().strip() != b"profile,pi,ni,ui":
            yield None                                      # another layout: the csv path reads it
            return
        rest = b""
        while True:
            data = fh.read(FAST_BLOCK_BYTES)
            block = rest + data
            if not block:
                return
            cut = block.rfind(b"\n") + 1 if data else len(block)
            if cut == 0:
                rest = block
                continue
            block, rest = block[:cut], block[cut:]
            raw = np.frombuffer(block, dtype=np.uint8)
            is_sep = np.isin(raw, sep_bytes)
            newline = np.flatnonzero(raw == ord("\n"))
            if not data and (newline.size == 0 or newline[-1] != raw.size - 1):
                newline = np.append(newline, raw.size)     # last line without a newline
            seps = np.cumsum(is_sep)[np.minimum(newline, raw.size - 1)]
            per_line = np.diff(np.concatenate([[0], seps])) + 1
            text = block.decode("ascii", errors="replace").replace(",", " ")
            try:
                tokens = np.fromstring(text, dtype=np.int64, sep=" ")
            except ValueError:
                yield None
                return
            if tokens.size != per_line.sum() or np.any(per_line < 4):
                yield None
                return
            yield tokens, per_line
            if not data:
                return


def _read_triplets_fast(path, max_profile_size, n_users, n_items):
    users, pos, neg, profiles = [], [], [], []
    for got in _fast_triplet_blocks(path):
        if got is None:
            return None
        tokens, per_line = got
        ends = np.cumsum(per_line)
        u, n, p = tokens[ends - 1], tokens[ends - 2], tokens[ends - 3]
        plen = per_line - 3
        keep = np.ones(tokens.size, dtype=bool)
        keep[np.concatenate([ends - 1, ends - 2, ends - 3])] = False
        flat = tokens[keep]
        if np.any(flat[np.cumsum(plen) - 1] != p):
            return None                                     # the checked path names the line
        for name, ids, upper, what in (("ui", u, n_users, "user"), ("pi", p, n_items, "item"),
                                       ("ni", n, n_items, "item"), ("profile", flat, n_items, "item")):
            check_id_range(ids, upper, path, name, what)
        profiles.append(profiles_to_matrix(flat + 1, plen, max_profile_size, drop_last=True))
        users.append(u), pos.append(p + 1), neg.append(n + 1)
    if not users:
        return None
    t = lambda parts: torch.from_numpy(np.concatenate(parts))
    return TripletSet(t(users), t(profiles), t(pos), t(neg))


def read_triplets(path, max_profile_size: int = 9, n_users: int | None = None,
                  n_items: int | None = None) -> TripletSet:
    """Read `naive-user-{train,validation}.csv` (`profile,pi,ni,ui`, 0-based ids).

    Item ids are shifted by +1, pi (the profile's last id) is removed from the profile,
    and the most recent `max_profile_size` remaining items are kept. Files in exactly
    the tutorial's layout take a numpy-only path (about 10x faster); anything else,
    and any malformed file, goes through the csv reader that names the bad line.
    """
    if max_profile_size < 1:
        raise ValueError(f"max_profile_size must be >= 1, got {max_profile_size}")
    if Path(path).is_file():
        fast = _read_triplets_fast(path, max_profile_size, n_users, n_items)
        if fast is not None:
            return fast
    fh, reader, col = open_csv(path, TRIPLET_COLUMNS)
    users, pos, neg, profiles = [], [], [], []
    with fh:
        for first, rows in csv_chunks(reader, path, len(col)):
            u = parse_ints([r[col["ui"]] for r in rows], path, "ui", first)
            p = parse_ints([r[col["pi"]] for r in rows], path, "pi", first)
            n = parse_ints([r[col["ni"]] for r in rows], path, "ni", first)
            flat, lengths = parse_id_lists([r[col["profile"]] for r in rows], path, "profile", first)
            check_id_range(u, n_users, path, "ui", "user")
            for name, ids in (("pi", p), ("ni", n), ("profile", flat)):
                check_id_range(ids, n_items, path, name, "item")
            ends = np.cumsum(lengths) - 1
            has = lengths > 0
            wrong = np.flatnonzero(~has | (flat[np.where(has, ends, 0)] != p))
            if wrong.size:
                i = int(wrong[0])
                raise ValueError(f"{path}, line {first + i}: the profile must end with pi={p[i]} "
                                 f"(the tutorial's format), got {rows[i][col['profile']]!r}")
            profiles.append(profiles_to_matrix(flat + 1, lengths, max_profile_size, drop_last=True))
            users.append(u), pos.append(p + 1), neg.append(n + 1)
    if not users:
        raise ValueError(f"{path}: no triplets after the header")
    t = lambda parts: torch.from_numpy(np.concatenate(parts))
    return TripletSet(t(users), t(profiles), t(pos), t(neg))


# ---------------------------------------------------------------------------- evaluation
@dataclass
class EvaluationGroups:
    """Evaluation groups after joining rows with equal (profile, user).

    user [G]; profile [G, Pmax] 1-based, right-padded (the full stored profile, up
    to 10 items, oldest first); targets: ragged 1-based ground-truth ids
    (targets_flat, targets_ptr) with group g's ids in targets_flat[ptr[g]:ptr[g+1]].
    """
    user: np.ndarray
    profile: np.ndarray
    targets_flat: np.ndarray
    targets_ptr: np.ndarray

    def __len__(self) -> int:
        return int(self.user.size)

    def targets(self, g: int) -> np.ndarray:
        return self.targets_flat[self.targets_ptr[g]:self.targets_ptr[g + 1]]

    @property
    def n_targets(self) -> np.ndarray:
        return np.diff(self.targets_ptr)

    @property
    def profile_size(self) -> np.ndarray:
        return (self.profile > 0).sum(1)


def read_evaluation(path, n_users: int | None = None, n_items: int | None = None) -> EvaluationGroups:
    """Read `naive-user-evaluation.csv` (`timestamp,user_id,predict,profile`, 0-based ids)."""
    fh, reader, col = open_csv(path, EVALUATION_COLUMNS)
    users, pflat, plen, tflat, tlen = [], [], [], [], []
    with fh:
        for first, rows in csv_chunks(reader, path, len(col)):
            u = parse_ints([r[col["user_id"]] for r in rows], path, "user_id", first)
            check_id_range(u, n_users, path, "user_id", "user")
            t, tl = parse_id_lists([r[col["predict"]] for r in rows], path, "predict", first)
            p, pl = parse_id_lists([r[col["profile"]] for r in rows], path, "profile", first)
            check_id_range(t, n_items, path, "predict", "item")
            check_id_range(p, n_items, path, "profile", "item")
            users.append(u), tflat.append(t), tlen.append(tl), pflat.append(p), plen.append(pl)
    if not users:
        raise ValueError(f"{path}: no evaluation rows after the header")
    user = np.concatenate(users)
    plen_all, tlen_all = np.concatenate(plen), np.concatenate(tlen)
    width = max(int(plen_all.max()), 1)
    profile = profiles_to_matrix(np.concatenate(pflat) + 1, plen_all, width)
    targets = np.concatenate(tflat) + 1

    # group rows with equal (profile, user): the first row of each group fixes the order
    key = np.concatenate([user[:, None], profile, plen_all[:, None]], axis=1)
    _, first_row, group_of = np.unique(key, axis=0, return_index=True, return_inverse=True)
    group_of = group_of.reshape(-1)
    rank = np.empty_like(first_row)
    rank[np.argsort(first_row, kind="stable")] = np.arange(first_row.size)
    group_of = rank[group_of]
    row_of_target = np.repeat(np.arange(user.size), tlen_all)
    tgroup = group_of[row_of_target]
    torder = np.argsort(tgroup, kind="stable")
    first_sorted = np.sort(first_row)
    counts = np.bincount(tgroup, minlength=first_row.size)
    return EvaluationGroups(user=user[first_sorted], profile=profile[first_sorted],
                            targets_flat=targets[torder],
                            targets_ptr=np.concatenate([[0], np.cumsum(counts)]))
