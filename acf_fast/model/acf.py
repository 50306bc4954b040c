"""`ACF`: the tutorial's model as a drop-in nn.Module whose hot path is a chosen backend."""

from __future__ import annotations

import numbers
import os

import torch
import torch.nn as nn

from ..backends import registry as _backend
from ..utils.devices import check_device
from .features import load_feature_table, table_from_tensor
from .reference import ACFUserNet

PAD = 0


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")
    return int(value)


def _id_tensor(ids, what: str) -> torch.Tensor:
    """An id list / array / tensor as an int64 tensor, refusing anything else by name."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise TypeError(f"{what} must be a count (int) or a list/array/tensor of integer ids, "
                        f"got {type(ids).__name__} {ids!r}")
    t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer ids, got {t.dtype}")
    return t.long()


def _count_ids(ids, what: str) -> int:
    """The tutorial passes id lists and sizes tables by max(id) + 1; a plain int is a count."""
    if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        return _positive_int(ids, what)
    ids = _id_tensor(ids, what)
    if ids.numel() == 0:
        raise ValueError(f"{what} must not be empty")
    if ids.min() < 0:
        raise ValueError(f"{what} contains a negative id ({int(ids.min())})")
    return int(ids.max()) + 1


def _catalogue(items) -> torch.Tensor:
    """The tutorial's `all_items`: item ids shifted to 1-based when they start at 0."""
    if isinstance(items, numbers.Integral) and not isinstance(items, bool):
        return torch.arange(1, _positive_int(items, "items") + 1)
    all_items = _id_tensor(items, "items")
    if all_items.numel() == 0:
        raise ValueError("items must not be empty")
    if all_items.min() < 0:
        raise ValueError(f"items contains a negative id ({int(all_items.min())})")
    return all_items + 1 if all_items.min() == 0 else all_items


class ACF(nn.Module):
    """Attentive Collaborative Filtering (Chen et al. 2017) as in the VisRec tutorial.

    users, items: the tutorial's id lists (or plain counts). items may be 0-based; the
        model uses 1-based item ids with 0 as padding.
    feature_path: the tutorial's `.npy` object array or `.h5` file, or pass `features=`,
        an in-memory tensor [N, 7, 7, F], [N, F, 7, 7] or [N, M, F] (row i = item id i+1).
    feature_dtype: float32 (default), or float16 / bfloat16 to halve the table.
    backend: "auto", "reference", "cpu" or "triton" (see acf_fast.backends.registry).
    features_on_host: keep the feature table in host memory when the module moves to a
        GPU (as the tutorial does: each batch's features are gathered on the host and
        copied over). For tables larger than GPU memory; slower.
    """

    def __init__(self, users, items, feature_path=None, model_dim=128, input_feature_dim=0,
                 tied_item_embedding=True, device=None, *, features=None,
                 feature_dtype=torch.float32, backend="auto", max_profile_size=9,
                 features_on_host=False):
        super().__init__()
        self.features_on_host = bool(features_on_host)
        if (feature_path is None) == (features is None):
            raise ValueError("give exactly one of feature_path= or features=")
        self.pad_token = PAD
        self.model_dim = _positive_int(model_dim, "model_dim")
        self.max_profile_size = _positive_int(max_profile_size, "max_profile_size")
        self.backend = backend
        _backend.resolve(backend, "cpu")  # reject unknown names now, not at the first batch
        self.feature_path = None if feature_path is None else os.fspath(feature_path)
        num_users = _count_ids(users, "users")
        self.register_buffer("all_items", _catalogue(items), persistent=False)
        num_items = int(self.all_items.max()) + 1

        table = (load_feature_table(feature_path, feature_dtype) if features is None
                 else table_from_tensor(features, feature_dtype))
        if table.shape[0] < num_items:
            raise ValueError(f"feature table has {table.shape[0] - 1} items but item ids go up to "
                             f"{num_items - 1}; the feature file does not match the interactions")
        if input_feature_dim and input_feature_dim != table.shape[-1]:
            raise ValueError(f"input_feature_dim={input_feature_dim} but the features have "
                             f"{table.shape[-1]} channels")
        self.input_feature_dim = int(table.shape[-1])
        self.num_components = int(table.shape[1])
        self.register_buffer("feature_table", table, persistent=False)

        self.item_model = nn.Embedding(num_items, self.model_dim, padding_idx=PAD)
        self.user_model = ACFUserNet(
            num_users, num_items, emb_dim=self.model_dim, input_feature_dim=self.input_feature_dim,
            profile_embedding=self.item_model if tied_item_embedding else None)
        self.model_args = {
            "users": num_users, "items": num_items - 1, "feature_path": self.feature_path,
            "model_dim": self.model_dim, "input_feature_dim": self.input_feature_dim,
            "tied_item_embedding": bool(tied_item_embedding),
        }
        if device is not None:
            self.to(check_device(device))

    def _apply(self, fn, recurse=True):
        """Device moves and dtype casts reach the feature table, except that a 16-bit table
        stays 16-bit (halving its memory is why it was asked for); no temporary copy of
        the table in another dtype is made."""
        table = self._buffers.pop("feature_table")
        try:
            super()._apply(fn, recurse)
        finally:
            target = fn(torch.empty(0, dtype=table.dtype, device=table.device))
            dtype = table.dtype if table.dtype in (torch.float16, torch.bfloat16) else target.dtype
            dev = table.device if self.features_on_host else target.device
            self._buffers["feature_table"] = table.to(device=dev, dtype=dtype)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Where the parameters are: the tutorial's attribute, kept true after .to()."""
        return self.item_model.weight.device

    @property
    def num_users(self) -> int:
        return self.user_model.user_embedding.num_embeddings

    @property
    def num_items(self) -> int:
        """Number of real items N (ids 1..N)."""
        return self.item_model.num_embeddings - 1

    def resolved_backend(self) -> str:
        return _backend.resolve(self.backend, self.item_model.weight.device)

    def _impl(self):
        return _backend.get(self.resolved_backend())

    # ------------------------------------------------------------------ validation
    def profile_mask_for(self, profile_ids: torch.Tensor) -> torch.Tensor:
        return profile_ids != PAD

    def _check_ids(self, ids: torch.Tensor, name: str, ndim: int, device=None) -> torch.Tensor:
        """Type, dtype and rank; the range is checked for the whole batch at once."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 or int32 tensor, got {ids.dtype}")
        if ids.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(ids.shape)}")
        return ids.to(device or self.item_model.weight.device, torch.long)

    @staticmethod
    def _check_ranges(checks, mask_mismatch=None) -> None:
        """All id ranges (and the mask's agreement) in one device->host sync: on a GPU every
        sync stalls the launch queue, and a step has up to nine such checks."""
        flags = [((ids < lowest) | (ids >= upper)).any() for _, ids, lowest, upper in checks]
        if mask_mismatch is not None:
            flags.append(mask_mismatch)
        if not flags or not torch.stack(flags).any():
            return
        for name, ids, lowest, upper in checks:  # error path only: find the offender
            lo, hi = int(ids.min()), int(ids.max())
            if lo < lowest or hi >= upper:
                raise ValueError(f"{name} contains id {lo if lo < lowest else hi}, "
                                 f"expected ids in [{lowest}, {upper - 1}]")
        raise ValueError("profile_mask disagrees with profile_ids: a slot must be masked "
                         "exactly when its id is the padding id 0")

    def _check_batch(self, user_ids, profile_ids, profile_mask, pos=None, neg=None, device=None):
        """Checked ids (int64) and mask on `device` (default: the parameters' device; a
        CUDA-graph step checks host batches on the CPU, so the GPU never waits)."""
        user_ids = self._check_ids(user_ids, "user_ids", 1, device)
        profile_ids = self._check_ids(profile_ids, "profile_ids", 2, device)
        if profile_ids.shape[0] != user_ids.shape[0]:
            raise ValueError(f"profile_ids has {profile_ids.shape[0]} rows but user_ids has "
                             f"{user_ids.shape[0]}")
        n_ids = self.num_items + 1
        checks = [("user_ids", user_ids, 0, self.num_users), ("profile_ids", profile_ids, 0, n_ids)]
        if pos is not None:
            pos = self._check_ids(pos, "pos", 1, device)
            neg = self._check_ids(neg, "neg", 1, device)
            if not (pos.shape[0] == neg.shape[0] == user_ids.shape[0]):
                raise ValueError(f"user_ids, pos and neg must have the same length, got "
                                 f"{user_ids.shape[0]}, {pos.shape[0]}, {neg.shape[0]}")
            # the padding id 0 is no item: scoring it would silently give 0
            checks += [("pos", pos, 1, n_ids), ("neg", neg, 1, n_ids)]
        derived = self.profile_mask_for(profile_ids)
        mismatch = None
        if profile_mask is None:
            profile_mask = derived
        else:
            if not isinstance(profile_mask, torch.Tensor):
                raise TypeError("profile_mask must be a torch.Tensor")
            if profile_mask.shape != profile_ids.shape:
                raise ValueError(f"profile_mask has shape {tuple(profile_mask.shape)}, expected "
                                 f"{tuple(profile_ids.shape)} like profile_ids")
            if profile_mask.dtype != torch.bool:
                if profile_mask.is_floating_point() or profile_mask.is_complex():
                    raise TypeError(f"profile_mask must be bool or integer 0/1, got {profile_mask.dtype}")
                profile_mask = profile_mask != 0
            profile_mask = profile_mask.to(profile_ids.device)
            mismatch = (profile_mask != derived).any()
        self._check_ranges(checks, mismatch)
        return user_ids, profile_ids, profile_mask, pos, neg

    # ------------------------------------------------------------------ model API
    def forward(self, user_ids, profile_ids, pos, neg, profile_mask=None):
        """Scores of positive and negative items: ((u_i' . v_pos) / D, (u_i' . v_neg) / D)."""
        user_ids, profile_ids, profile_mask, pos, neg = self._check_batch(
            user_ids, profile_ids, profile_mask, pos, neg)
        return self._impl().pair_scores(self, user_ids, profile_ids, pos, neg, profile_mask)

    def user_vectors(self, user_ids, profile_ids, profile_mask=None, return_attentions=False):
        """(user [B, D], alpha [B, P] | None, beta [B, P, M] | None)."""
        user_ids, profile_ids, profile_mask, _, _ = self._check_batch(user_ids, profile_ids, profile_mask)
        return self._impl().user_vectors(self, user_ids, profile_ids, profile_mask, return_attentions)

    def get_predictions(self, user, items):
        return (user * self.item_model(items)).sum(-1) / self.model_dim

    @torch.no_grad()
    def recommend_all(self, user_ids, profile_ids, return_attentions=False, profile_mask=None,
                      k=None, exclude=None, block_items: int = 65536):
        """Score every catalogue item (`self.all_items`, column c = item all_items[c]).

        k=None returns scores [B, N] (and alpha [B, P], beta [B, P, M] when
        return_attentions). With k, returns (top-k scores [B, k], top-k item ids [B, k])
        without materialising more than one [B, block_items] block. `exclude` is an
        optional [B, E] tensor of item ids (0 = none) to rank last; with k, places that
        exclusions leave empty hold item id 0 with score -inf.
        """
        user, alpha, beta = self.user_vectors(user_ids, profile_ids, profile_mask, return_attentions)
        from .scoring import score_catalogue

        result = score_catalogue(user, self.item_model.weight, self.all_items, self.model_dim,
                                 k=k, exclude=exclude, block_items=block_items)
        # NaN (or +inf) scores would rank first and give meaningless metrics downstream.
        # Checked on what is returned (the user vectors and the scores), not on the whole
        # item table: that would cost a pass over N x D per call, per user in a loop.
        scores = result[0] if k is not None else result
        if not (torch.isfinite(user).all() & ~(scores.isnan() | (scores == float("inf"))).any()):
            raise ValueError("the model's user vectors or item embeddings are not finite "
                             "(NaN/inf parameters, e.g. from a diverged training run); no "
                             "ranking is possible")
        if return_attentions:
            return result, alpha, beta
        return result

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_checkpoint(cls, checkpoint, *, feature_path=None, features=None,
                        feature_dtype=torch.float32, backend="auto", map_location="cpu", device=None,
                        n_users=None, n_items=None):
        """Build from a tutorial checkpoint {epoch, loss, model_args, state_dict, optimizer}
        (a dict or a path). feature_path / features override the checkpoint's feature_path.

        n_users / n_items: the dataset the model is about to see. A checkpoint of another
        dataset is refused before the feature table is read (which would otherwise fail
        with a message blaming the feature file), and so is a feature file of another size.
        """
        from .checkpoint import read_checkpoint

        if device is not None:
            check_device(device)
        ckpt = read_checkpoint(checkpoint, map_location=map_location)
        args = dict(ckpt.get("model_args") or {})
        state = ckpt["state_dict"]
        name = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "the checkpoint"
        for what, key, expected in (("users", "user_model.user_embedding.weight", n_users),
                                    ("items", "item_model.weight", n_items)):
            if expected is not None and key in state:
                have = state[key].shape[0] - (what == "items")
                if have != expected:
                    raise ValueError(f"checkpoint {name} was trained with {have} {what} but the "
                                     f"dataset has {expected}: it belongs to another dataset")
        emb = state["item_model.weight"]
        users = args.get("users", state["user_model.user_embedding.weight"].shape[0])
        items = args.get("items", emb.shape[0] - 1)
        if features is None and feature_path is None:
            feature_path = args.get("feature_path")
            if feature_path is None:
                raise ValueError("checkpoint names no feature_path; pass feature_path= or features=")
        model = cls(users, items, feature_path=feature_path, features=features,
                    model_dim=args.get("model_dim", emb.shape[1]),
                    tied_item_embedding=args.get("tied_item_embedding", True),
                    feature_dtype=feature_dtype, backend=backend)
        model.load_state_dict(state)
        if n_items is not None:
            check_feature_count(model, n_items, feature_path if features is None else "features=")
        if "max_profile_size" in ckpt:
            model.max_profile_size = int(ckpt["max_profile_size"])
        if device is not None:
            model.to(device)
        return model


def check_feature_count(model: ACF, n_items: int, features) -> None:
    """The feature file must describe exactly the catalogue the data was prepared with."""
    have = int(model.feature_table.shape[0]) - 1
    if have != n_items:
        raise ValueError(f"feature file {features} has {have} items but the prepared data has "
                         f"{n_items}; use the feature file given to `prepare`")


def load_model(checkpoint, features, backend, device, n_users=None, n_items=None) -> ACF:
    """A trained model in eval mode, checked against the dataset it is about to score."""
    return ACF.from_checkpoint(checkpoint, feature_path=features, backend=backend, device=device,
                               n_users=n_users, n_items=n_items).eval()
