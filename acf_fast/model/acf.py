"""`ACF`: the tutorial's model as a drop-in nn.Module whose hot path is a chosen backend."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..backends import registry as _backend
from ..utils.devices import check_device
from . import ids as _ids
from .batch_checks import PAD, BatchChecks
from .checkpoint import CHECKSUM_KEY, build_from_checkpoint, check_feature_count, read_checkpoint
from .features import load_feature_table, table_from_tensor
from .reference import ACFUserNet

__all__ = ["ACF", "DATASET_KEY", "PAD", "check_checkpoint_dataset", "check_feature_count", "load_model"]


class ACF(BatchChecks, nn.Module):
    """Attentive Collaborative Filtering (Chen et al. 2017) as in the VisRec tutorial.

    The tutorial's arguments, with its meanings:
    users, items: id lists (or plain counts: n users are ids 0..n-1, N items ids 1..N).
        items may be 0-based; the model uses 1-based item ids with 0 as padding.
    feature_path: the tutorial's `.npy` object array or `.h5` file, or pass `features=`,
        an in-memory tensor [N, 7, 7, F], [N, F, 7, 7] or [N, M, F] (row i = item id i+1).
    model_dim: D. input_feature_dim: 0, or F (checked against the features).
    tied_item_embedding: the profile attends over the scoring embedding (the default).
    device: where the model goes (the tutorial puts its inputs there).
    force_h5: read the `.h5` file next to feature_path (same stem), as the tutorial does.

    acf_fast's own, keyword only:
    feature_dtype: float32 (default), or float16 / bfloat16 to halve the table.
    backend: "auto", "reference", "cpu" or "triton" (see acf_fast.backends.registry).
    features_on_host: keep the feature table in host memory when the module moves to a
        GPU (as the tutorial does: each batch's features are gathered on the host and
        copied over). For tables larger than GPU memory; slower.
    """

    def __init__(self, users, items, feature_path=None, model_dim=128, input_feature_dim=0,
                 tied_item_embedding=True, device=None, force_h5=False, *, features=None,
                 feature_dtype=torch.float32, backend="auto", max_profile_size=9,
                 features_on_host=False):
        super().__init__()
        self.features_on_host = bool(features_on_host)
        if (feature_path is None) == (features is None):
            raise ValueError("give exactly one of feature_path= or features=")
        self.pad_token = PAD
        self.model_dim = _ids.positive_int(model_dim, "model_dim")
        self.max_profile_size = _ids.positive_int(max_profile_size, "max_profile_size")
        self.backend = backend
        _backend.resolve(backend, "cpu")  # reject unknown names now, not at the first batch
        self.using_h5 = bool(force_h5) and feature_path is not None
        if self.using_h5:
            feature_path = Path(feature_path).with_suffix(".h5")
        self.feature_path = None if feature_path is None else os.fspath(feature_path)
        # the tutorial's attributes: the ids as given (plain ints), all_items 1-based
        self.users, self.items = _ids.user_ids(users), _ids.item_ids(items)
        num_users = max(self.users) + 1
        self.register_buffer("all_items", _ids.catalogue(self.items), persistent=False)
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

        self.tied_item_embedding = bool(tied_item_embedding)
        self.item_model = nn.Embedding(num_items, self.model_dim, padding_idx=PAD)
        self.user_model = ACFUserNet(
            num_users, num_items, emb_dim=self.model_dim, input_feature_dim=self.input_feature_dim,
            profile_embedding=self.item_model if tied_item_embedding else None)
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
        return self.score(user, self.item_model(items))

    def score(self, user, items):
        """(user . item) / D over the last dimension (the tutorial's `score`)."""
        return (user * items).sum(-1) / self.model_dim

    @property
    def feature_data(self) -> torch.Tensor:
        """The tutorial's feature table [N+1, 7, 7, F] (row 0 = padding): a view of
        `feature_table` [N+1, M, F] (returned as that when M is not 49)."""
        t = self.feature_table
        return t.view(t.shape[0], 7, 7, t.shape[-1]) if t.shape[1] == 49 else t

    def get_features(self, ids):
        """The tutorial's `get_features`: the features of item ids (an int, list or tensor)."""
        ids = torch.as_tensor([ids] if isinstance(ids, int) else ids, dtype=torch.long)
        return self.feature_data[ids.to(self.feature_table.device)]

    # ------------------------------------------------------------------ recommendation
    @torch.no_grad()
    def recommend_all(self, user_id, profile_ids, return_attentions=False, profile_mask=None,
                      **batched):
        """The tutorial's `recommend_all`: scores of every catalogue item, column c = item
        `all_items[c]`.

        One user (user_id [1] or 0-d, profile_ids [1, P]), as the tutorial calls it:
        scores [N]; with return_attentions, (scores [N], component attentions [P, M],
        profile attentions [1, P]), the tutorial's order, shapes and values (a padded
        slot's component attentions are 1/M there, as in the tutorial).
        Several users, where the tutorial's code has no answer: scores [B, N], and
        attentions [B, P, M] and [B, P]. Top-k, exclusions and blocked scoring:
        `recommend_batch`.
        """
        if batched:
            raise TypeError(f"recommend_all takes the tutorial's arguments; {', '.join(batched)}: "
                            "use recommend_batch(user_ids, profile_ids, k=, exclude=, ...)")
        if isinstance(user_id, torch.Tensor) and user_id.dim() == 0:
            user_id = user_id.reshape(1)
        out = self.recommend_batch(user_id, profile_ids, return_attentions=return_attentions,
                                   profile_mask=profile_mask)
        if not return_attentions:
            return out[0] if out.shape[0] == 1 else out
        scores, component, profile = out
        padded = (profile_ids == PAD).to(component.device).unsqueeze(-1)
        component = component.masked_fill(padded, 1.0 / component.shape[-1])
        if scores.shape[0] == 1:
            return scores[0], component[0], profile
        return scores, component, profile

    @torch.no_grad()
    def recommend_batch(self, user_ids, profile_ids, k=None, exclude=None, return_attentions=False,
                        profile_mask=None, block_items: int = 65536, block_users: int | None = None):
        """Batched recommendation for B users at once (acf_fast's API; any B, 1 included).

        k=None returns scores [B, N] (column c = item all_items[c]). With k, returns (top-k
        scores [B, k], top-k item ids [B, k]) without materialising more than one
        [block_users, block_items] block. `exclude`: item ids (0 = none) to rank last, a
        [B, E] tensor or array or one list per user; with k, places that exclusions leave
        empty hold item id 0 with score -inf. return_attentions adds, in the tutorial's
        order, component attentions [B, P, M] and profile attentions [B, P], both 0 on
        padded slots: (result, component, profile). Users are taken in blocks of
        `block_users` (default: what fits a few hundred MiB of working memory).
        """
        from .scoring import recommend_in_blocks

        return recommend_in_blocks(self, user_ids, profile_ids, k=k, exclude=exclude,
                                   return_attentions=return_attentions, profile_mask=profile_mask,
                                   block_items=block_items, block_users=block_users)

    # ------------------------------------------------------------------ checkpoints
    def args(self) -> dict:
        """The tutorial's `model_args`: plain Python values (id lists, ints, the feature
        path), so that a checkpoint holding them loads with torch.load(weights_only=True)
        and in either side's `ACF.from_checkpoint`."""
        return {"users": list(self.users), "items": list(self.items),
                "feature_path": self.feature_path, "model_dim": self.model_dim,
                "input_feature_dim": self.input_feature_dim,
                "tied_item_embedding": self.tied_item_embedding}

    @property
    def model_args(self) -> dict:
        return self.args()

    @classmethod
    def from_checkpoint(cls, checkpoint, device=None, force_h5=False, *, feature_path=None,
                        features=None, feature_dtype=None, backend="auto",
                        map_location="cpu", n_users=None, n_items=None, dataset=None,
                        check_dataset=True):
        """Build from a checkpoint {epoch, loss, model_args, state_dict, optimizer} (a dict
        or a path), the tutorial's or acf_fast's. device / force_h5: as the tutorial's.
        feature_path / features override the checkpoint's feature_path.
        feature_dtype: the table's dtype; None (default) reads the one the checkpoint was
        trained with (float32 for checkpoints that record none).

        n_users / n_items: the dataset the model is about to see. A checkpoint of another
        dataset is refused before the feature table is read (which would otherwise fail
        with a message blaming the feature file), and so is a feature file of another size.
        dataset: the PreparedDataset it is about to see (its sizes are n_users / n_items by
        default); a checkpoint that recorded another dataset's fingerprint is refused
        unless check_dataset=False (see check_checkpoint_dataset).
        """
        return _from_checkpoint(
            cls, checkpoint, dataset, check_dataset, device=device, force_h5=force_h5,
            feature_path=feature_path, features=features, feature_dtype=feature_dtype,
            backend=backend, map_location=map_location, n_users=n_users, n_items=n_items)


DATASET_KEY = "dataset_fingerprint"      # what train records of its PreparedDataset
REQUIRED_STATE = ("item_model.weight", "user_model.user_embedding.weight")


def check_checkpoint_dataset(ckpt: dict, dataset, name) -> None:
    """Refuse a checkpoint trained on another dataset than `dataset` (a PreparedDataset,
    or anything with .fingerprint and .folder): the fingerprint `train` recorded in it
    against the dataset's. A checkpoint without one (older files, the tutorial's) is
    accepted unchecked."""
    recorded = ckpt.get(DATASET_KEY)
    if recorded is None or dataset is None or recorded == dataset.fingerprint:
        return
    trained_on = (ckpt.get("train_config") or {}).get("data_dir")
    source = f"recorded in {name}" + (f" when it was trained on {trained_on}" if trained_on else "")
    raise ValueError(f"{name} was trained on another dataset: fingerprint {recorded} ({source}) "
                     f"is not {dataset.fingerprint} (of {dataset.folder}, from its dataset.json); "
                     "use the data it was trained on, or pass --any-dataset (library: "
                     "check_dataset=False) to use this one on purpose")


def check_state_dict(ckpt: dict, name, n_users=None, n_items=None) -> None:
    """The state dict has the tensors the model is built from, of this dataset's sizes."""
    state = ckpt["state_dict"]
    missing = [k for k in REQUIRED_STATE if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{name}: its state_dict lacks {', '.join(missing)}: the file is damaged "
                         "or not an ACF checkpoint; use another checkpoint (or train again)")
    for what, key, expected in (("users", REQUIRED_STATE[1], n_users), ("items", REQUIRED_STATE[0], n_items)):
        have = state[key].shape[0] - (what == "items")
        if expected is not None and have != expected:
            raise ValueError(f"checkpoint {name} was trained with {have} {what} but the dataset "
                             f"has {expected}: it belongs to another dataset")


def _from_checkpoint(cls, checkpoint, dataset, check_dataset, *, n_users, n_items, **kwargs):
    if kwargs["device"] is not None:
        check_device(kwargs["device"])
    ckpt = read_checkpoint(checkpoint, map_location=kwargs["map_location"])
    name = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "the checkpoint"
    if dataset is not None:
        n_users = dataset.n_users if n_users is None else n_users
        n_items = dataset.n_items if n_items is None else n_items
    check_state_dict(ckpt, name, n_users, n_items)      # sizes first: the plainest message
    if check_dataset:
        check_checkpoint_dataset(ckpt, dataset, name)
    verified = {k: v for k, v in ckpt.items() if k != CHECKSUM_KEY}   # not hashed a second time
    try:
        return build_from_checkpoint(cls, verified, n_users=n_users, n_items=n_items, name=name,
                                     **kwargs)
    except RuntimeError as exc:
        if "state_dict" not in str(exc):
            raise
        detail = " ".join(str(exc).split())
        raise ValueError(f"{name}: its state_dict does not fit the model it describes ({detail[:400]}); "
                         "the file is damaged or from another model: use another checkpoint") from None


def load_model(checkpoint, features, backend, device, n_users=None, n_items=None, *, dataset=None,
               check_dataset=True, feature_dtype=None) -> ACF:
    """A trained model in eval mode, checked against the dataset it is about to score
    (its sizes, and with `dataset` its fingerprint unless check_dataset=False); its feature
    table in the dtype it was trained with unless `feature_dtype` says otherwise."""
    return ACF.from_checkpoint(checkpoint, feature_path=features, backend=backend, device=device,
                               n_users=n_users, n_items=n_items, dataset=dataset,
                               check_dataset=check_dataset, feature_dtype=feature_dtype).eval()
