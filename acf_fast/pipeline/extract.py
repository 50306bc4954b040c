"""`extract`: ResNet50 `layer4` features of an image folder, in the tutorial's `.h5` layout.

torchvision is an optional extra (`pip install acf_fast[extract]`), imported only
here. Weights come from a local file (a torchvision ResNet50 state dict, e.g.
`resnet50-11ad3fa6.pth`); nothing is downloaded. `random_weights=True` builds an
untrained network, for tests and for checking the pipeline end to end.

Output: `image_filenames` (N,) and `resnet50/layer4` (N, 2048, 7, 7) float32,
written chunk by chunk to a temporary file that is renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..utils.outputs import check_output_file
from ..utils.progress import bar as tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _torchvision():
    try:
        import torchvision
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise RuntimeError(
            "`extract` needs torchvision (and Pillow), an optional extra: install a torchvision "
            "that matches this torch (pip install acf_fast[extract]); "
            f"importing it failed with: {type(exc).__name__}: {exc}") from exc
    return torchvision


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no images (expected files ending in {sorted(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path, size: int = 224) -> np.ndarray:
    """Resize the short side to `size`, center-crop to size x size, ImageNet-normalise -> (3, size, size)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def build_backbone(weights=None, random_weights: bool = False) -> torch.nn.Module:
    """ResNet50 up to layer4 (no pooling, no classifier)."""
    tv = _torchvision()
    if weights is None and not random_weights:
        raise ValueError("give weights= (a local ResNet50 state-dict file) or random_weights=True; "
                         "nothing is downloaded")
    net = tv.models.resnet50(weights=None)
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"ResNet50 weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = net.load_state_dict(state, strict=False)
        needed = [k for k in missing if not k.startswith("fc.")]
        if needed:
            raise ValueError(f"{path}: not a ResNet50 state dict (missing {needed[:3]}...)")
    return torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                               net.layer1, net.layer2, net.layer3, net.layer4).eval()


@torch.no_grad()
def extract(images_dir, out_path, weights=None, random_weights: bool = False, batch_size: int = 16,
            image_size: int = 224, device: str = "cpu", progress: bool = True) -> Path:
    """Write the `.h5` feature file for every image in `images_dir` (sorted by file name)."""
    import h5py

    check_output_file(out_path, "output file")
    files = list_images(images_dir)
    net = build_backbone(weights, random_weights).to(device)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    grid = image_size // 32
    try:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("image_filenames", data=np.array([f.name for f in files], dtype="S"))
            ds = fh.create_dataset("resnet50/layer4", shape=(len(files), 2048, grid, grid),
                                   dtype="float32", chunks=(1, 2048, grid, grid))
            for s in tqdm(range(0, len(files), batch_size), desc="extracting", unit="batch",
                          disable=not progress):
                batch = np.stack([load_image(f, image_size) for f in files[s:s + batch_size]])
                feats = net(torch.from_numpy(batch).to(device)).float().cpu().numpy()
                ds[s:s + feats.shape[0]] = feats
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path
