"""`extract`: ResNet50 layer4 features into the tutorial's .h5 layout (torchvision is optional)."""

import sys

import numpy as np
import pytest


def tiny_images(folder, n=3):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        size = (40 + 10 * i, 32)              # odd, non-square sizes: resize + center crop
        Image.fromarray(rng.integers(0, 255, size=(*size[::-1], 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_missing_torchvision_is_explained(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    from acf_fast.pipeline.extract import extract

    monkeypatch.setitem(sys.modules, "torchvision", None)    # makes `import torchvision` fail
    with pytest.raises(RuntimeError, match="needs torchvision"):
        extract(tiny_images(tmp_path / "img"), tmp_path / "f.h5", random_weights=True)


def test_weights_are_required(tmp_path):
    pytest.importorskip("torchvision")
    from acf_fast.pipeline.extract import build_backbone

    with pytest.raises(ValueError, match="nothing is downloaded"):
        build_backbone()
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_backbone(weights=tmp_path / "absent.pth")


def test_extract_random_weights_layout(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("PIL")
    import h5py

    from acf_fast.pipeline.extract import extract
    from acf_fast.model.features import load_feature_table

    out = extract(tiny_images(tmp_path / "img"), tmp_path / "f.h5", random_weights=True, batch_size=2,
                  progress=False)
    with h5py.File(out, "r") as fh:
        assert [n.decode() for n in fh["image_filenames"][:]] == ["im0.png", "im1.png", "im2.png"]
        feats = fh["resnet50/layer4"][:]
    assert feats.shape == (3, 2048, 7, 7) and np.isfinite(feats).all()
    table = load_feature_table(out)
    assert tuple(table.shape) == (4, 49, 2048)
