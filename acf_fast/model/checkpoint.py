"""Tutorial-format checkpoints {epoch, loss, model_args, state_dict, optimizer}, written atomically."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from ..utils.atomic_folder import fsync_dir
from ..utils.devices import check_device
from ..utils.safe_pickle import Refused, check_numeric, refusal_message, torch_safe_globals

REQUIRED_KEYS = ("state_dict",)
CHECKSUM_KEY = "acf_fast_checksum"
FEATURE_DTYPE_KEY = "feature_dtype"      # the dtype of the table the model was trained on
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _digest_into(h, value) -> None:
    """Feed a checkpoint's contents to `h` in a fixed order: tensors by their bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(b"D")
        for key in sorted(value, key=str):
            h.update(repr(key).encode())
            _digest_into(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(b"L")
        if all(type(item) is int for item in value):  # id lists: the same bytes, at once
            h.update("".join(map(repr, value)).encode())
            return
        for item in value:
            _digest_into(h, item)
    else:
        h.update(repr(value).encode())


def checksum(ckpt: dict) -> str:
    """sha256 of everything in the checkpoint but the checksum itself.

    Stored inside the dict (so the file stays a plain tutorial checkpoint) and checked on
    read: torch.load happily returns flipped bits as different numbers.
    """
    h = hashlib.sha256()
    _digest_into(h, {k: v for k, v in ckpt.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


CHECKPOINT_ALLOWED = "tensors, numbers, strings, containers and numeric numpy arrays"
# how torch's weights-only unpickler names what it refused
_TORCH_REFUSAL = re.compile(r"GLOBAL (\S+) was not an allowed global|unsupported GLOBAL (\S+) whose"
                            r"|unrecognized function (.+?)(?: which belongs|$)|but got (<class \S+>)",
                            re.MULTILINE)


def load_checkpoint_file(path: Path, map_location="cpu"):
    """torch.load that never runs code from the file: torch's weights-only unpickler, which
    admits tensors and plain values, plus numeric numpy arrays (the tutorial's id arrays);
    anything else raises ValueError naming the file and what it named."""
    try:
        with torch.serialization.safe_globals(torch_safe_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Refused as exc:  # a numpy dtype the allowlist's wrapper refused
        raise ValueError(refusal_message(path, "checkpoint", exc.name, CHECKPOINT_ALLOWED)) from None
    except pickle.UnpicklingError as exc:
        found = _TORCH_REFUSAL.search(str(exc))
        if found is None:
            raise ValueError(f"{path}: corrupt or truncated checkpoint, or one holding other "
                             f"objects than {CHECKPOINT_ALLOWED} (UnpicklingError: "
                             f"{str(exc).splitlines()[-1]})") from None
        name = next(g for g in found.groups() if g)
        name = name if "." in name or "<" in name else f"builtins.{name}"  # torch drops it
        raise ValueError(refusal_message(path, "checkpoint", name, CHECKPOINT_ALLOWED)) from None
    except Exception as exc:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})") from exc
    check_numeric(ckpt, path, "checkpoint", CHECKPOINT_ALLOWED)
    return ckpt


def read_checkpoint(checkpoint, map_location="cpu") -> dict:
    """A checkpoint dict, or the path of one; corrupt or truncated files raise ValueError,
    and so do files that would need anything but plain values to load (never run)."""
    if isinstance(checkpoint, dict):
        ckpt = checkpoint
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = load_checkpoint_file(path, map_location)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: not a checkpoint dict (got {type(ckpt).__name__})")
    if CHECKSUM_KEY in ckpt and checksum(ckpt) != ckpt[CHECKSUM_KEY]:
        where = "" if isinstance(checkpoint, dict) else f"{checkpoint}: "
        raise ValueError(f"{where}corrupt checkpoint (checksum mismatch); its contents changed "
                         "after it was written")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}; expected keys epoch, loss, model_args, "
                         "state_dict, optimizer")
    return ckpt


def make_checkpoint(model, optimizer=None, epoch=0, loss=float("nan"), **extra) -> dict:
    """The tutorial's checkpoint dict; model_args is `model.args()` (id lists, ints, the
    feature path), so the tutorial's `ACF.from_checkpoint` loads it too."""
    ckpt = {
        "epoch": epoch,
        "loss": loss,
        "model_args": model.args(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }
    table = getattr(model, "feature_table", None)
    names = {v: k for k, v in FEATURE_DTYPES.items()}
    if table is not None and table.dtype in names:   # evaluate / recommend / explain follow it
        ckpt[FEATURE_DTYPE_KEY] = names[table.dtype]
    ckpt.update(extra)
    ckpt[CHECKSUM_KEY] = checksum(ckpt)
    return ckpt


def feature_dtype_name(value) -> str:
    """'float32' / 'float16' / 'bfloat16' from such a name or a torch dtype; ValueError else."""
    names = {v: k for k, v in FEATURE_DTYPES.items()}
    if isinstance(value, torch.dtype) and value in names:
        return names[value]
    if isinstance(value, str) and value in FEATURE_DTYPES:
        return value
    raise ValueError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {value!r}")


def recorded_feature_dtype(ckpt: dict, name="the checkpoint") -> str:
    """The feature dtype a checkpoint was trained with: its `feature_dtype`, else its
    train_config's, else float32 (older checkpoints and the tutorial's, which train on it)."""
    value = ckpt.get(FEATURE_DTYPE_KEY)
    if value is None:
        value = (ckpt.get("train_config") or {}).get("feature_dtype", "float32")
    try:
        return feature_dtype_name(value)
    except ValueError:
        raise ValueError(f"{name} records the feature dtype {value!r}, which is none of "
                         f"{', '.join(FEATURE_DTYPES)}: the file is damaged; pass the dtype "
                         "(--feature-dtype)") from None


def resume_feature_dtype(last, asked=None) -> str:
    """The feature dtype to resume the run of checkpoint `last` in: the one it was trained
    with (a resumed bf16 run goes on reading bf16 features). Another one, asked for, is
    refused now, before the table is read (and its cache built) in it."""
    run = recorded_feature_dtype(read_checkpoint(last), last)
    if asked is not None and feature_dtype_name(asked) != run:
        raise ValueError(f"cannot resume {last}: it was trained with feature_dtype={run!r}, this "
                         f"run asks for feature_dtype={feature_dtype_name(asked)!r}")
    return run


def choose_feature_dtype(ckpt: dict, override=None, name="the checkpoint") -> torch.dtype:
    """The dtype to read the feature table in: `override` when given (a notice when it is not
    the one the model was trained with), else the checkpoint's own."""
    trained = recorded_feature_dtype(ckpt, name)
    if override is None:
        return FEATURE_DTYPES[trained]
    asked = feature_dtype_name(override)
    if asked != trained:
        print(f"acf_fast: reading {asked} features for a model trained on {trained} ones "
              f"({name}), as asked", file=sys.stderr)
    return FEATURE_DTYPES[asked]


def save_checkpoint(ckpt: dict, path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: never half-written.

    Interrupted anywhere (an exception, a second Ctrl-C), the previous file at `path`
    stays as it was and the temporary file is removed. The folder is fsynced after the
    rename so that the new name also survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def build_from_checkpoint(cls, checkpoint, *, device=None, force_h5=False, feature_path=None,
                          features=None, feature_dtype=None, backend="auto",
                          map_location="cpu", n_users=None, n_items=None, name=None):
    """`cls.from_checkpoint` (cls: ACF): the model a checkpoint describes, its state loaded.
    feature_dtype None: the one the checkpoint records (choose_feature_dtype)."""
    if device is not None:
        check_device(device)
    ckpt = read_checkpoint(checkpoint, map_location=map_location)
    args = dict(ckpt.get("model_args") or {})
    state = ckpt["state_dict"]
    name = name or (checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "the checkpoint")
    feature_dtype = choose_feature_dtype(ckpt, feature_dtype, name)
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
                force_h5=force_h5, feature_dtype=feature_dtype, backend=backend)
    model.load_state_dict(state)
    if n_items is not None:
        check_feature_count(model, n_items, model.feature_path if features is None else "features=")
    if "max_profile_size" in ckpt:
        model.max_profile_size = int(ckpt["max_profile_size"])
    if device is not None:
        model.to(device)
    return model


def check_feature_count(model, n_items: int, features) -> None:
    """The feature file must describe exactly the catalogue the data was prepared with."""
    have = int(model.feature_table.shape[0]) - 1
    if have != n_items:
        raise ValueError(f"feature file {features} has {have} items but the prepared data has "
                         f"{n_items}; use the feature file given to `prepare`")
