"""`prepare`: the tutorial's sampling protocol (docs/sampling.md), vectorised.

1. Interactions (one per distinct user-item pair, latest time kept) are ordered per
   user by time and grouped into baskets by (timestamp, user).
2. Users with more than `holdout_baskets` (10) baskets have their last 10 baskets
   held out: `naive-user-evaluation.csv` gets one row per held-out basket
   (`timestamp,user_id,predict,profile`, profile = the last 10 training items).
3. Every user gets ceil(total / n_users) triplets for train and likewise for
   validation (so the totals can exceed the requested ones by up to n_users - 1):
   pi uniform over the user's training items, the profile the up-to-10 training
   items ending at pi, ni uniform over items the user never consumed (held-out
   items count as consumed). A (user, pi, ni) drawn twice, within or across train
   and validation, is rejected and redrawn. A user with fewer distinct (pi, ni)
   pairs than that gets each of them once; a user whose quota is a large share of
   their pairs gets a uniform random subset of them drawn directly, which is the
   same distribution without the rejection sampler's long tail of repeats.
All draws come from one `numpy.random.default_rng(seed)` (seed 0 by default) in a
fixed order, so the files are reproducible.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils.atomic_folder import atomic_folder, check_target
from ..utils.progress import bar as tqdm
from .csv_io import join_ids, write_csv_atomic
from .formats import Interactions, check_user_ids, read_interactions
from .history import UserHistory
from .prepared import (CHECKS, EVALUATION_FILE, FILES, HISTORY_FILE, OVERWRITE_HINT, TRAIN_FILE,
                       VALIDATION_FILE, file_checks, is_prepared_folder, write_manifest)

PROFILE_WINDOW = 10          # the tutorial's profile: up to 10 items ending at pi
HOLDOUT_BASKETS = 10
MAX_ROUNDS = 10_000


@dataclass
class Split:
    """Chronological training items and held-out baskets per user (0-based item ids)."""
    n_users: int
    n_items: int
    train_ptr: np.ndarray
    train_items: np.ndarray
    consumed_ptr: np.ndarray
    consumed_items: np.ndarray
    eval_user: np.ndarray        # one entry per held-out basket
    eval_time: np.ndarray
    eval_ptr: np.ndarray         # basket b's items: eval_items[eval_ptr[b]:eval_ptr[b+1]]
    eval_items: np.ndarray


def split_baskets(inter: Interactions, n_items: int, holdout: int = HOLDOUT_BASKETS) -> Split:
    """Order each user's interactions by time, form baskets, hold out the last `holdout`."""
    if holdout < 1:
        raise ValueError(f"holdout_baskets must be an integer >= 1, got {holdout!r}")
    order = np.lexsort((inter.item, inter.timestamp, inter.user))  # ties in a basket: by item id
    user, item, time = inter.user[order], inter.item[order], inter.timestamp[order]
    n_users = inter.n_users
    new_basket = np.ones(user.size, dtype=bool)
    new_basket[1:] = (user[1:] != user[:-1]) | (time[1:] != time[:-1])
    basket_id = np.cumsum(new_basket) - 1                        # global basket index
    basket_user = user[new_basket]
    n_baskets = np.bincount(basket_user, minlength=n_users)
    first_basket = np.concatenate([[0], np.cumsum(n_baskets)])[:-1]
    basket_rank = basket_id - first_basket[user]                  # 0-based within the user
    held = (n_baskets[user] > holdout) & (basket_rank >= n_baskets[user] - holdout)

    def csr(mask):
        counts = np.bincount(user[mask], minlength=n_users)
        return np.concatenate([[0], np.cumsum(counts)]), item[mask]

    train_ptr, train_items = csr(~held)
    consumed_ptr, consumed_items = csr(np.ones_like(held))
    held_baskets = np.unique(basket_id[held])
    hb_first = np.searchsorted(basket_id, held_baskets)
    eval_counts = np.bincount(np.searchsorted(held_baskets, basket_id[held]), minlength=held_baskets.size)
    return Split(n_users, n_items, train_ptr, train_items, consumed_ptr, consumed_items,
                 eval_user=user[hb_first], eval_time=time[hb_first],
                 eval_ptr=np.concatenate([[0], np.cumsum(eval_counts)]), eval_items=item[held])


def _isin_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """keys in sorted_keys (sorted, int64), by binary search: O(len(keys) log n), no re-sort."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[at] == keys


def _draw_negatives(rng, users: np.ndarray, n_items: int, consumed_keys: np.ndarray) -> np.ndarray:
    """Uniform items the user never consumed, by rejection (consumed_keys = user*n_items+item, sorted)."""
    neg = rng.integers(0, n_items, size=users.size)
    todo = np.flatnonzero(_isin_sorted(users * n_items + neg, consumed_keys))
    while todo.size:
        neg[todo] = rng.integers(0, n_items, size=todo.size)
        todo = todo[_isin_sorted(users[todo] * n_items + neg[todo], consumed_keys)]
    return neg


def _nth_free_item(users: np.ndarray, j: np.ndarray, split: Split, consumed_sorted: np.ndarray) -> np.ndarray:
    """The j-th (0-based) item, in id order, that each user never consumed.

    consumed_sorted: split.consumed_items sorted within each user. With the user's consumed items
    c_0 < c_1 < ..., the j-th free item is j + #{i : c_i - i <= j}; c_i - i is non-decreasing, so
    one global binary search over user * (n_items + 1) + (c_i - i) counts them for every draw.
    """
    base = np.int64(split.n_items + 1)
    n_consumed = np.diff(split.consumed_ptr)
    rank = np.arange(consumed_sorted.size) - np.repeat(split.consumed_ptr[:-1], n_consumed)
    shifted = np.repeat(np.arange(split.n_users, dtype=np.int64), n_consumed) * base + (consumed_sorted - rank)
    below = np.searchsorted(shifted, users * base + j, side="right") - split.consumed_ptr[users]
    return j + below


def _enumerate_user(rng, split: Split, u: int, want: int, n_free: int,
                    consumed_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`want` distinct (pi position, ni) of user u, uniformly without replacement and in random order.

    Rejection-sampling distinct uniform (pi, ni) pairs until `want` are found gives exactly this
    distribution: a uniformly random ordered `want`-subset of the user's n_train x n_free pairs.
    Drawing it directly costs O(want) (rng.choice) instead of a coupon-collector's tail, and a
    user whose quota is all of their pairs gets every pair, each once.
    """
    n_train = int(split.train_ptr[u + 1] - split.train_ptr[u])
    idx = rng.choice(n_train * n_free, size=want, replace=False)
    users = np.full(want, u, dtype=np.int64)
    pos = split.train_ptr[u] + idx // n_free
    neg = _nth_free_item(users, idx % n_free, split, consumed_sorted)
    return pos, neg


def sample_triplets(split: Split, per_user: int, seed: int = 0, progress: bool = True,
                    quota: str = ""):
    """Draw `per_user` distinct (user, pi, ni) per user (fewer if the user has fewer).

    A user has n_train x n_free distinct triplets (n_train training items as pi, n_free items never
    consumed as ni); one with fewer than `per_user` gets every one of them, once, in random order.
    Users whose quota is at most half of their distinct triplets (the usual case: ten thousand
    triplets among millions) are sampled all together as the protocol states: pi and ni uniform,
    a (user, pi, ni) drawn before rejected and redrawn. The others (quota above half, or fewer
    than a quarter of the catalogue left as negatives), where rejection would spend most draws on
    repeats, get the same distribution drawn directly: a uniform random ordered subset of their
    pairs. Both use one `numpy.random.default_rng(seed)` in a fixed order, so the result is
    reproducible.

    `quota` says what `per_user` is made of in the warning about short users (prepare: its
    training + validation counts).
    Returns (user, pi_pos, ni) in draw order grouped by user, where pi_pos indexes
    split.train_items (so the profile window is known without searching).
    """
    rng = np.random.default_rng(seed)
    n_train = np.diff(split.train_ptr)
    n_consumed = np.diff(split.consumed_ptr)
    n_free = np.maximum(split.n_items - n_consumed, 0)
    capacity = n_train * n_free
    want = np.minimum(per_user, capacity)
    short = np.flatnonzero(want < per_user)
    if short.size and np.any(n_train[short] > 0):
        u = int(short[n_train[short] > 0][0])
        what = f"the per-user quota: {quota}" if quota else "the per-user quota"
        print(f"acf_fast prepare: {short.size} user(s) allow fewer than {per_user} distinct "
              f"triplets ({what}; e.g. user {u}: at most {capacity[u]}); they get what exists",
              file=sys.stderr)
    direct = (want > 0) & ((2 * want > capacity) | (4 * n_free < split.n_items))
    want_rejection = np.where(direct, 0, want)
    consumed_user = np.repeat(np.arange(split.n_users), n_consumed)
    consumed_keys = np.sort(consumed_user * split.n_items + split.consumed_items)
    key_base = np.int64(split.n_items)

    users_all, pos_all, neg_all = [], [], []
    seen = np.zeros(0, dtype=np.int64)                         # sorted keys drawn so far
    have = np.zeros(split.n_users, dtype=np.int64)
    bar = tqdm(total=int(want.sum()), desc="sampling triplets", unit="trip", disable=not progress)
    for _ in range(MAX_ROUNDS):
        deficit = want_rejection - have
        if not deficit.any():
            break
        u = np.repeat(np.arange(split.n_users), deficit)
        pos = split.train_ptr[u] + (rng.random(u.size) * n_train[u]).astype(np.int64)
        neg = _draw_negatives(rng, u, split.n_items, consumed_keys)
        key = (u * key_base + split.train_items[pos]) * key_base + neg
        _, first = np.unique(key, return_index=True)
        fresh = np.zeros(u.size, dtype=bool)
        fresh[first] = True                                    # first draw of a repeated key
        fresh &= ~_isin_sorted(key, seen)                      # and never drawn before
        new = np.sort(key[fresh])
        seen = np.insert(seen, np.searchsorted(seen, new), new)
        users_all.append(u[fresh]), pos_all.append(pos[fresh]), neg_all.append(neg[fresh])
        have += np.bincount(u[fresh], minlength=split.n_users)
        bar.update(int(fresh.sum()))
    else:   # each draw is new with probability >= 1/2 here, so this takes a few dozen rounds
        raise RuntimeError(f"triplet sampling did not finish in {MAX_ROUNDS} rounds")
    del seen
    if direct.any():
        order = np.lexsort((split.consumed_items, np.repeat(np.arange(split.n_users), n_consumed)))
        consumed_sorted = split.consumed_items[order].astype(np.int64)
        for u in np.flatnonzero(direct).tolist():
            pos, neg = _enumerate_user(rng, split, u, int(want[u]), int(n_free[u]), consumed_sorted)
            users_all.append(np.full(pos.size, u, dtype=np.int64)), pos_all.append(pos), neg_all.append(neg)
            bar.update(pos.size)
    bar.close()
    if not users_all:
        return (np.zeros(0, dtype=np.int64),) * 3
    u, pos, neg = (np.concatenate(x) for x in (users_all, pos_all, neg_all))
    order = np.argsort(u, kind="stable")                       # grouped by user, draw order kept
    return u[order], pos[order], neg[order]


def window_strings(split: Split) -> list[str]:
    """For every position of split.train_items, the tutorial's profile string there: the up-to-10
    training items of that user ending at that position. There are as many as training
    interactions (far fewer than triplets), so each triplet row is a lookup, not a join."""
    n = split.train_items.size
    user_of = np.repeat(np.arange(split.n_users), np.diff(split.train_ptr))
    start = np.maximum(split.train_ptr[user_of], np.arange(n) - (PROFILE_WINDOW - 1)).tolist()
    items = split.train_items.astype(str).tolist()
    return [" ".join(items[a:p + 1]) for p, a in enumerate(start)]


def write_triplets(path, split: Split, windows: list[str], user, pos, neg, desc: str,
                   progress: bool, chunk: int = 1 << 18) -> Path:
    """`profile,pi,ni,ui` rows, written chunk by chunk to a temporary file that is then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pi_items = split.train_items[pos]
    try:
        with open(tmp, "w") as fh, tqdm(total=int(user.size), desc=desc, unit="row",
                                        disable=not progress) as bar:
            fh.write("profile,pi,ni,ui\n")
            for s in range(0, user.size, chunk):
                e = min(s + chunk, user.size)
                fh.write("".join(f"{windows[q]},{i},{n},{u}\n" for q, i, n, u in zip(
                    pos[s:e].tolist(), pi_items[s:e].tolist(), neg[s:e].tolist(), user[s:e].tolist())))
                bar.update(e - s)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _evaluation_rows(split: Split):
    for b in range(split.eval_user.size):
        u = split.eval_user[b]
        hi = split.train_ptr[u + 1]
        lo = max(split.train_ptr[u], hi - PROFILE_WINDOW)
        yield (split.eval_time[b], u, join_ids(split.eval_items[split.eval_ptr[b]:split.eval_ptr[b + 1]]),
               join_ids(split.train_items[lo:hi]))


def feature_item_count(features_path, feature_dtype=None) -> int:
    """Number of items in a feature file. With `feature_dtype` (a name or torch dtype), its
    cache in that dtype is built on the way (every row read and checked now, and the first
    `train` in that dtype maps it at once); without, only the file's layout is read, and
    no cache of a dtype nobody may use is written."""
    from ..model import features as F
    from ..model.checkpoint import FEATURE_DTYPES, feature_dtype_name

    if feature_dtype is None:
        return F.feature_count(features_path)
    dtype = FEATURE_DTYPES[feature_dtype_name(feature_dtype)]
    return int(F.load_feature_table(features_path, dtype).shape[0]) - 1


def validation_count(n_train: int) -> int:
    """The default validation count: the tutorial's ratio (10M training : 500k validation)."""
    return math.ceil(n_train / 20)


def prepare(interactions, features, out_dir, n_train: int = 10_000_000, n_validation: int | None = None,
            seed: int = 0, holdout_baskets: int = HOLDOUT_BASKETS, progress: bool = True,
            overwrite: bool = False, feature_dtype=None) -> dict:
    """Run the tutorial protocol; write the three CSVs, history.npz and dataset.json into out_dir.

    out_dir is written whole or not at all (a temporary sibling folder renamed into place),
    and the manifest records each file's rows, bytes and sha256. An out_dir that already holds
    a prepared dataset is refused unless overwrite=True (a run trained from it would no longer
    match); a non-empty folder of other files is always refused. User ids must be dense
    (`formats.check_user_ids`) and timestamps finite.

    `features` (the tutorial's .npy or .h5) fixes the catalogue size N; interactions naming
    an item id >= N are refused. Its cache is built in `feature_dtype` when given, else by
    the first step that reads the table, in the dtype that step uses.

    Triplet counts (docs/sampling.md#triplet-quotas): every user gets ceil(n_train / n_users)
    training and ceil(n_validation / n_users) validation triplets (n_validation default:
    ceil(n_train / 20), the tutorial's 10M : 500k; 0: no validation set), so the totals are those
    per-user counts times the number of users and can exceed n_train / n_validation (n_train=2000
    over 30 users gives 67 each, 2,010 in all). A user with fewer distinct (pi, ni) pairs than
    both counts together gets every pair once, training first, so the totals can also be
    smaller; the manifest records the counts written.
    `holdout_baskets` (>= 1): users with more baskets than this have their last
    `holdout_baskets` baskets held out for evaluation.
    Returns the manifest (also saved as dataset.json).
    """
    out = Path(out_dir)
    if n_validation is None and isinstance(n_train, (int, np.integer)) and not isinstance(n_train, bool):
        n_validation = validation_count(int(n_train))
    for name, value, low in (("n_train", n_train, 1), ("n_validation", n_validation, 0),
                             ("holdout_baskets", holdout_baskets, 1), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    folder = dict(overwrite=overwrite, replaceable=is_prepared_folder, what="prepared dataset",
                  overwrite_hint=OVERWRITE_HINT)
    check_target(out, **folder)                 # before minutes of work, and again at the end
    features = Path(features)
    if not features.exists():
        raise FileNotFoundError(f"feature file not found: {features}")
    n_items = feature_item_count(features, feature_dtype)
    try:
        inter = read_interactions(interactions, n_items=n_items)
    except ValueError as exc:
        if "unknown item id" not in str(exc):
            raise
        raise ValueError(f"{exc}; the feature file {features} has {n_items} items, so the "
                         "interactions and the feature file do not match") from None
    check_user_ids(inter, interactions)
    split = split_baskets(inter, n_items, holdout_baskets)
    active = int((np.diff(split.train_ptr) > 0).sum())
    n_users = split.n_users
    per_train = math.ceil(n_train / n_users)
    per_val = math.ceil(n_validation / n_users) if n_validation else 0
    user, pos, neg = sample_triplets(split, per_train + per_val, seed, progress,
                                     quota=f"{per_train} training + {per_val} validation triplets")

    # first per_train draws of each user train, the rest validate (no key in both)
    first_of_user = np.searchsorted(user, user, side="left")
    is_train = (np.arange(user.size) - first_of_user) < per_train
    windows = window_strings(split)
    manifest = {
        "interactions": str(Path(interactions).resolve()),
        "features": str(features.resolve()),
        "n_users": n_users, "n_items": n_items, "n_interactions": len(inter),
        "n_users_with_training_items": active,
        "n_evaluation_users": int(np.unique(split.eval_user).size),
        "n_evaluation_baskets": int(split.eval_user.size),
        "n_train_triplets": int(is_train.sum()), "n_validation_triplets": int((~is_train).sum()),
        "seed": seed, "holdout_baskets": holdout_baskets,
        "files": dict(FILES),
    }
    rows = {"train": manifest["n_train_triplets"], "validation": manifest["n_validation_triplets"],
            "evaluation": manifest["n_evaluation_baskets"], "history": n_users}
    with atomic_folder(out, **folder) as tmp:
        write_triplets(tmp / TRAIN_FILE, split, windows, user[is_train], pos[is_train],
                       neg[is_train], "writing train", progress)
        write_triplets(tmp / VALIDATION_FILE, split, windows, user[~is_train], pos[~is_train],
                       neg[~is_train], "writing validation", progress)
        write_csv_atomic(tmp / EVALUATION_FILE, ["timestamp", "user_id", "predict", "profile"],
                         _evaluation_rows(split))
        UserHistory(n_users, n_items, split.train_ptr, split.train_items + 1,
                    split.consumed_ptr, split.consumed_items + 1).save(tmp / HISTORY_FILE)
        manifest[CHECKS] = file_checks(tmp, rows)
        write_manifest(tmp, manifest)
    return manifest
