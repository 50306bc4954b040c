"""Tutorial-format checkpoints: round trip, tutorial-style model_args, corrupt files."""

import pytest
import torch

from acf_fast import ACF
from acf_fast.model.checkpoint import make_checkpoint, read_checkpoint, save_checkpoint
from acf_fast.testing import random_batch, random_model


def test_round_trip(tmp_path):
    model = random_model(d=8, f=6, m=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    batch = random_batch(model)
    pos, neg = model(*batch)
    (neg - pos).mean().backward()
    opt.step()
    path = save_checkpoint(make_checkpoint(model, opt, epoch=3, loss=0.5), tmp_path / "ckpt.pt")
    ckpt = read_checkpoint(path)
    assert set(ckpt) >= {"epoch", "loss", "model_args", "state_dict", "optimizer"}
    assert ckpt["epoch"] == 3
    again = ACF.from_checkpoint(path, features=model.feature_table[1:])
    torch.testing.assert_close(again(*batch), model(*batch))


def test_tutorial_style_model_args_with_id_lists(tmp_path):
    model = random_model(n_users=4, n_items=7, d=8, f=6, m=4)
    ckpt = {"epoch": 0, "loss": 1.0, "optimizer": None, "state_dict": model.state_dict(),
            "model_args": {"users": list(range(4)), "items": list(range(7)), "model_dim": 8,
                           "feature_path": None, "tied_item_embedding": True}}
    again = ACF.from_checkpoint(ckpt, features=model.feature_table[1:])
    batch = random_batch(model)
    torch.testing.assert_close(again(*batch), model(*batch))


def test_corrupt_and_foreign_files(tmp_path):
    model = random_model(d=8, f=6, m=4)
    path = save_checkpoint(make_checkpoint(model), tmp_path / "c.pt")
    data = path.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "t.pt")
    torch.save([1, 2], tmp_path / "l.pt")
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        read_checkpoint(tmp_path / "l.pt")
    with pytest.raises(ValueError, match="lacks"):
        read_checkpoint({"epoch": 1})
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.pt")


def test_save_leaves_no_temporary_files(tmp_path):
    save_checkpoint(make_checkpoint(random_model(d=8, f=6, m=4)), tmp_path / "a" / "c.pt")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["c.pt"]


def test_flipped_bits_are_detected(tmp_path):
    model = random_model(d=8, f=6, m=4)
    path = save_checkpoint(make_checkpoint(model, epoch=2), tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    ckpt = read_checkpoint(path)
    raw = ckpt["state_dict"]["item_model.weight"].numpy().tobytes()
    at = bytes(data).find(raw[64:96])  # a stretch inside the embedding's stored bytes
    assert at > 0
    data[at + 3] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_checkpoint(tmp_path / "flipped.pt")
    edited = read_checkpoint(path)
    edited["epoch"] = 5
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_checkpoint(edited)
