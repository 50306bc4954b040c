"""`synth`: a Wikimedia-Commons-shaped synthetic dataset with structure ACF can learn.

Written in the tutorial's own formats so the real loading path runs:
  interactions.csv    user_id,item_id,timestamp   (0-based ids; baskets share a timestamp)
  features.h5         image_filenames, resnet50/layer4 (N, F, 7, 7) float32     (formats "h5")
  features.npy        a plain float32 (N, F, 7, 7) array, and features.names.txt (formats "npy")
  planted.npz         the ground truth: concepts per item, planted cells, user tastes
  images/             optional tiny PNGs (one per item) so `explain` can draw overlays
  synth.json          the configuration used

Only the feature formats asked for are written (default: the .h5 alone; each file is
N x F x 49 x 4 bytes, 13.2 GB at the Wikimedia sizes), a block of items at a time as they
are generated (data.feature_files): memory is bounded by one 512-item block of float64
noise, whatever N is (0.4 GB at F = 2048). The random stream is the one the generator drew
when it built the whole array, so a seed gives the same data as before.

The planted structure, and why it is shaped this way:
- C visual concepts, each a sparse non-negative direction in feature space (layer4
  features are post-ReLU, so non-negative, and objects activate a few channels
  strongly). Every item shows 1-3 concepts, each in 2-3 grid cells; the other cells
  are background: one of a few textures plus noise, so background varies from item
  to item but carries no taste signal.
- Users like `concepts_per_user` concepts (1 by default); most of their interactions are items showing a liked
  concept, the rest are popular items picked regardless of taste (noise the item
  attention can learn to ignore by looking at the concept cells).
- Activity is heavy tailed (log-normal, median about 16 interactions, a few users
  with hundreds or thousands) and items are grouped into baskets of 1-4 that share
  a timestamp, like uploads made in one session.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..utils.progress import bar as tqdm
from .feature_files import FORMATS, FeatureFiles, check_space, clean_stale, parse_formats, rows_per_write

GRID = 7
M = GRID * GRID


@dataclass
class SynthConfig:
    n_users: int = 400
    n_items: int = 400
    n_concepts: int = 12
    feature_dim: int = 64        # ResNet50 has 2048; 64 keeps the demo fast on 2 CPU cores
    concepts_per_user: int = 1
    median_interactions: float = 16.0
    activity_sigma: float = 1.0  # log-normal spread of interactions per user
    max_interactions: int = 64   # cap for ordinary users (keeps their picks within their taste)
    heavy_users: int = 3         # users with a large share of the catalogue
    heavy_fraction: float = 0.4  # ... this fraction of the catalogue each (thousands on Wikimedia)
    noise_rate: float = 0.1      # interactions that ignore the user's taste
    popularity_exponent: float = 0.4  # Zipf exponent of item popularity within the catalogue
    n_textures: int = 6
    concept_strength: float = 3.0
    images: bool = True          # tiny PNGs (needs Pillow)
    image_cell_px: int = 8
    seed: int = 0
    formats: tuple = ("h5",)     # feature files: "h5" and/or "npy" (data.feature_files)


def _concept_vectors(rng, n_concepts: int, dim: int) -> np.ndarray:
    active = max(4, dim // 10)
    vecs = np.zeros((n_concepts, dim), dtype=np.float32)
    for c in range(n_concepts):
        idx = rng.choice(dim, size=active, replace=False)
        vecs[c, idx] = rng.uniform(1.0, 2.0, size=active)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def _place_concepts(rng, n_items: int, n_concepts: int):
    """item_concepts [N, 3] (-1 pad) and cell_concept [N, 49] (-1 = background)."""
    n_per_item = rng.choice([1, 2, 3], size=n_items, p=[0.5, 0.35, 0.15])
    item_concepts = np.full((n_items, 3), -1, dtype=np.int64)
    cell_concept = np.full((n_items, M), -1, dtype=np.int64)
    for i in range(n_items):
        concepts = rng.choice(n_concepts, size=n_per_item[i], replace=False)
        item_concepts[i, :concepts.size] = concepts
        cells = rng.permutation(M)
        taken = 0
        for c in concepts:
            k = int(rng.integers(2, 4))
            cell_concept[i, cells[taken:taken + k]] = c
            taken += k
    return item_concepts, cell_concept


BLOCK_ITEMS = 512   # items per draw of their random numbers: the stream depends on it, keep it


def _feature_blocks(rng, cfg: SynthConfig, cell_concept, concept_vecs):
    """Yield (first item, float32 [b, F, 7, 7]), non-negative, b <= rows_per_write(F).

    The draws are made per BLOCK_ITEMS items in one order (shades, noise, strengths), as
    when the whole [N, M, F] array was built; the arithmetic is the same per element, so
    the values are identical, but only one block's float64 noise is held at a time."""
    n, dim = cell_concept.shape[0], cfg.feature_dim
    textures = np.abs(rng.normal(0.0, 1.0, size=(cfg.n_textures, dim))).astype(np.float32)
    textures /= np.linalg.norm(textures, axis=1, keepdims=True)
    texture_of = rng.integers(0, cfg.n_textures, size=n)
    rows = rows_per_write(dim)
    noise = np.empty((min(n, BLOCK_ITEMS), M, dim))          # reused by every block
    for s in range(0, n, BLOCK_ITEMS):
        e = min(n, s + BLOCK_ITEMS)
        shade = rng.uniform(0.5, 1.0, size=(e - s, M, 1))
        z = noise[:e - s]
        rng.standard_normal(out=z)       # rng.normal(0, 0.15) draws these, times 0.15
        z *= 0.15
        np.abs(z, out=z)
        strength = cfg.concept_strength * rng.uniform(0.8, 1.2, size=(e - s, M, 1))
        for a in range(s, e, rows):
            b = min(e, a + rows)
            r = slice(a - s, b - s)
            cc = cell_concept[a:b]
            grid = textures[texture_of[a:b]][:, None, :] * shade[r]          # background
            np.copyto(grid, concept_vecs[np.maximum(cc, 0)] * strength[r], where=(cc >= 0)[..., None])
            grid += z[r]                                                     # [b, M, F] float64
            # [b, F, M] float32 in one copy (the cast rounds as assigning into float32 did)
            yield a, np.ascontiguousarray(grid.transpose(0, 2, 1), dtype=np.float32).reshape(
                b - a, dim, GRID, GRID)


def _activity(rng, cfg: SynthConfig) -> np.ndarray:
    n = np.exp(rng.normal(np.log(cfg.median_interactions), cfg.activity_sigma, size=cfg.n_users))
    n = np.clip(np.round(n), 3, max(3, min(cfg.max_interactions, cfg.n_items // 4))).astype(np.int64)
    heavy = rng.choice(cfg.n_users, size=min(cfg.heavy_users, cfg.n_users), replace=False)
    n[heavy] = max(3, int(cfg.heavy_fraction * cfg.n_items))
    return n


def _interactions(rng, cfg: SynthConfig, item_concepts):
    """(user, item, timestamp) arrays; each user's items are distinct, baskets share a time."""
    n_items = item_concepts.shape[0]
    popularity = 1.0 / (1.0 + rng.permutation(n_items)) ** cfg.popularity_exponent  # long tail
    holders = [np.flatnonzero((item_concepts == c).any(1)) for c in range(cfg.n_concepts)]
    concept_pop = np.array([popularity[h].sum() for h in holders])
    concept_pop /= concept_pop.sum()
    user_concepts = np.stack([rng.choice(cfg.n_concepts, size=cfg.concepts_per_user, replace=False,
                                         p=concept_pop) for _ in range(cfg.n_users)])
    activity = _activity(rng, cfg)
    users, items, times = [], [], []
    for u in range(cfg.n_users):
        liked = np.unique(np.concatenate([holders[c] for c in user_concepts[u]]))
        weights = np.full(n_items, 0.0)
        weights[liked] = (1 - cfg.noise_rate) * popularity[liked] / popularity[liked].sum()
        weights += cfg.noise_rate * popularity / popularity.sum()
        k = int(min(activity[u], np.count_nonzero(weights)))
        chosen = rng.choice(n_items, size=k, replace=False, p=weights / weights.sum())
        basket_sizes = []
        while sum(basket_sizes) < k:
            basket_sizes.append(int(min(1 + rng.poisson(0.8), 4)))
        basket_sizes[-1] -= sum(basket_sizes) - k
        start = int(rng.integers(1_500_000_000, 1_600_000_000))
        gaps = rng.exponential(86_400.0, size=len(basket_sizes)).astype(np.int64) + 1
        basket_time = start + np.cumsum(gaps)
        users.append(np.full(k, u)), items.append(chosen)
        times.append(np.repeat(basket_time, basket_sizes))
    return (np.concatenate(users), np.concatenate(items), np.concatenate(times), user_concepts)


def _write_images(folder: Path, names, cell_concept, texture_rgb, concept_rgb, cell_px, rng,
                  progress: bool = False) -> None:
    try:
        from PIL import Image
    except ImportError as exc:
        raise RuntimeError("writing synthetic images needs Pillow: pip install pillow "
                           "(or pass images=False / --no-images)") from exc
    folder.mkdir(parents=True, exist_ok=True)
    size = GRID * cell_px
    for i, name in enumerate(tqdm(names, desc="synth: images", unit="image", disable=not progress)):
        grid = np.where(cell_concept[i, :, None] >= 0, concept_rgb[np.maximum(cell_concept[i], 0)],
                        texture_rgb[i][None, :])
        img = np.repeat(np.repeat(grid.reshape(GRID, GRID, 3), cell_px, 0), cell_px, 1)
        img = np.clip(img + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / name)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_features(out: Path, names, feats: np.ndarray, formats=FORMATS):
    """An in-memory [N, F, 7, 7] array as feature files: (the .npy's path, the .h5's path),
    None for a format not asked for."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    with FeatureFiles(out, names, feats.shape[1], formats) as files:
        files.write(0, feats)
    return files.paths.get("npy"), files.paths.get("h5")


def _check(name: str, value, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {valid}, got {value!r}")


def _validate(cfg: SynthConfig) -> None:
    """Refuse out-of-range settings up front, naming the setting, its value and the valid range
    (instead of a numpy error from deep inside the generator)."""
    def real(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    def integer(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name in ("n_users", "n_items", "n_concepts", "feature_dim", "concepts_per_user",
                 "max_interactions", "n_textures", "image_cell_px"):
        v = getattr(cfg, name)
        _check(name, v, integer(v) and v >= 1, "an integer >= 1")
    for name in ("heavy_users", "seed"):
        v = getattr(cfg, name)
        _check(name, v, integer(v) and v >= 0, "an integer >= 0")
    v = cfg.median_interactions
    _check("median_interactions", v, real(v) and 0 < v < math.inf, "a finite number > 0")
    for name in ("activity_sigma", "popularity_exponent", "concept_strength"):
        v = getattr(cfg, name)
        _check(name, v, real(v) and 0 <= v < math.inf, "a finite number >= 0")
    for name in ("noise_rate", "heavy_fraction"):
        v = getattr(cfg, name)
        _check(name, v, real(v) and 0 <= v <= 1, "in [0, 1]")
    cfg.formats = parse_formats(cfg.formats)


def synth(out_dir, config: SynthConfig | None = None, progress: bool = True, **overrides) -> dict:
    """Generate the dataset into out_dir; returns a summary (paths and statistics)."""
    cfg = config or SynthConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"unknown synth option {key!r}; expected one of {list(asdict(cfg))}")
        setattr(cfg, key, value)
    _validate(cfg)
    if cfg.concepts_per_user > cfg.n_concepts or cfg.n_concepts < 3:
        raise ValueError(f"need n_concepts >= max(3, concepts_per_user); got n_concepts={cfg.n_concepts}, "
                         f"concepts_per_user={cfg.concepts_per_user}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: give a folder path for the synthetic data")
    earlier = (out / "synth.json").is_file()     # an earlier synth's folder: its files are ours
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    check_space(out, cfg.n_items, cfg.feature_dim, cfg.formats)
    rng = np.random.default_rng(cfg.seed)
    concept_vecs = _concept_vectors(rng, cfg.n_concepts, cfg.feature_dim)
    item_concepts, cell_concept = _place_concepts(rng, cfg.n_items, cfg.n_concepts)
    names = [f"item_{i:06d}.png" for i in range(cfg.n_items)]
    with FeatureFiles(out, names, cfg.feature_dim, cfg.formats) as files:   # published at the end
        with tqdm(total=cfg.n_items, desc=f"synth: features ({','.join(cfg.formats)})",
                  unit="item", disable=not progress) as bar:
            for first, block in _feature_blocks(rng, cfg, cell_concept, concept_vecs):
                files.write(first, block)
                bar.update(len(block))
        user, item, time, user_concepts = _interactions(rng, cfg, item_concepts)
    if earlier:   # never in a folder of someone else's files: their features.h5 is not ours
        files.remove_others()

    inter_path = out / "interactions.csv"

    def write_inter(p):
        with open(p, "w") as fh:
            fh.write("user_id,item_id,timestamp\n")
            np.savetxt(fh, np.stack([user, item, time], 1), fmt="%d", delimiter=",")
    _atomic(inter_path, write_inter)
    _atomic(out / "planted.npz", lambda p: np.savez(
        p, item_concepts=item_concepts, cell_concept=cell_concept, planted_cells=cell_concept >= 0,
        user_concepts=user_concepts, concept_vectors=concept_vecs))
    if cfg.images:
        img_rng = np.random.default_rng(cfg.seed + 1)
        concept_rgb = img_rng.uniform(40, 255, size=(cfg.n_concepts, 3))
        texture_rgb = img_rng.uniform(90, 160, size=(cfg.n_items, 1)).repeat(3, 1)
        _write_images(out / "images", names, cell_concept, texture_rgb, concept_rgb,
                      cfg.image_cell_px, img_rng, progress)
    per_user = np.bincount(user, minlength=cfg.n_users)
    path_of = {f: str(p) for f, p in files.paths.items()}
    summary = {
        "config": asdict(cfg), "interactions": str(inter_path), "formats": list(cfg.formats),
        "features_npy": path_of.get("npy"), "features_h5": path_of.get("h5"),
        "planted": str(out / "planted.npz"),
        "images": str(out / "images") if cfg.images else None,
        "n_interactions": int(user.size), "median_interactions_per_user": float(np.median(per_user)),
        "max_interactions_per_user": int(per_user.max()),
    }
    _atomic(out / "synth.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    return summary


def load_planted(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "planted.npz"
    if not path.exists():
        raise FileNotFoundError(f"planted ground truth not found: {path}")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
