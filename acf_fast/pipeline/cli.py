"""`acf-fast` / `python -m acf_fast`: every pipeline step as a subcommand.

    acf-fast synth     OUT [--users N --items N --feature-dim F ...]
    acf-fast prepare   INTERACTIONS FEATURES OUT [--n-train N --n-validation N --seed 0]
    acf-fast train     DATA OUT [--epochs 10 --loss warp --lr 1e-3 --resume ...]
    acf-fast evaluate  CHECKPOINT DATA [--out DIR]
    acf-fast recommend CHECKPOINT DATA [--users 1,2,3 | all] [-k 10] [--out recs.json]
    acf-fast explain   CHECKPOINT DATA --user U --out fig.png [--images DIR]
    acf-fast extract   IMAGES OUT.h5 --weights resnet50.pth
    acf-fast demo      [--out demo_out]
    acf-fast info      machine, ISA extensions, the cpu backend's measured GEMM choice

Bad input (missing files or columns, unknown ids, mismatched feature files, a
checkpoint of another dataset) and a hostile environment (a full disk, a read-only or
wrongly typed output path, a damaged file, too little memory, a run folder another run
holds) end with one line `acf-fast: error: ...` and exit status 2; `--traceback` shows
more. The boundary is `main()`: every error a user or the machine can cause, nothing
that only a bug in acf_fast raises (those keep their traceback).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..data.synth import SynthConfig
from .arg_types import count as _count, formats as _formats, number as _number
from .errors import USER_ERRORS, describe_error

_positive_float = _number(positive=True)
_non_negative_float = _number(positive=False)
_BACKENDS = ["auto", "reference", "cpu", "triton"]
_DTYPES = ["float32", "float16", "bfloat16"]
_BACKEND_HELP = ("ACF kernels: auto picks triton on CUDA and the native cpu extension on the CPU "
                 "(reference, plain PyTorch, where those are unavailable)")
_THREADS_HELP = "torch CPU threads (default: torch's choice; the demo uses 1)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where it says something: not for a None default, a
    required option, a flag (store_true), or a help text that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.required
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or "default" in text.lower()):
            return text
        return super()._get_help_string(action)


def _add_threads(p, default=argparse.SUPPRESS):
    """--threads on the main parser (default None) and on every subcommand: a subcommand's
    copy does not set the attribute unless given (SUPPRESS), so it never overrides one given
    before the subcommand."""
    p.add_argument("--threads", type=_count(1), default=default, help=_THREADS_HELP)


def _add_runtime(p, feature_dtype: bool = True):
    p.add_argument("--backend", default="auto", choices=_BACKENDS, help=_BACKEND_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--features", default=None, help="feature file (default: the one `prepare` used)")
    if feature_dtype:   # train has its own
        p.add_argument("--feature-dtype", default=None, choices=_DTYPES,
                       help="feature table dtype (default: the one the checkpoint was trained "
                            "with; another one is used with a notice)")
    p.add_argument("--any-dataset", action="store_true",
                   help="use a checkpoint on another dataset than the one it was trained on (its "
                        "recorded fingerprint differs; refused by default)")


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    ap = argparse.ArgumentParser(prog="acf-fast", description="Attentive Collaborative Filtering pipeline",
                                 formatter_class=fmt)
    ap.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    _add_threads(ap, default=None)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", formatter_class=fmt, help="write a synthetic Wikimedia-shaped dataset")
    p.add_argument("out", help="folder for interactions.csv, the feature files and images")
    d = SynthConfig()
    p.add_argument("--users", type=_count(1), default=d.n_users, help="number of users")
    p.add_argument("--items", type=_count(1), default=d.n_items, help="number of items")
    p.add_argument("--concepts", type=_count(1), default=d.n_concepts,
                   help="planted visual concepts (the ground truth explain can outline)")
    p.add_argument("--concepts-per-user", type=_count(1), default=d.concepts_per_user,
                   help="concepts each user prefers")
    p.add_argument("--feature-dim", type=_count(1), default=d.feature_dim,
                   help="feature channels F (ResNet50 layer4 has 2048)")
    p.add_argument("--median-interactions", type=_positive_float, default=d.median_interactions,
                   help="median interactions per user")
    p.add_argument("--noise-rate", type=float, default=d.noise_rate,
                   help="share of interactions that ignore the user's concepts, in [0, 1]")
    p.add_argument("--formats", type=_formats, default="h5",
                   help="feature files to write, comma-separated: h5 (features.h5, the tutorial's "
                        "HDF5 layout, names inside) and/or npy (features.npy, a plain float32 "
                        "(N, F, 7, 7) array, names in features.names.txt). Each is N x F x 196 "
                        "bytes: 13.2 GB at 32,958 items x 2048")
    p.add_argument("--no-images", action="store_true", help="skip writing item images")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data")

    p = sub.add_parser("prepare", formatter_class=fmt, help="the tutorial's sampling: triplets + evaluation file")
    p.add_argument("interactions", help="interactions CSV (the tutorial's format)")
    p.add_argument("features", help="item feature file (.npy or .h5) fixing the catalogue")
    p.add_argument("out", help="folder for the triplet CSVs, history.npz and dataset.json")
    p.add_argument("--n-train", type=_count(1), default=10_000_000,
                   help="training triplets; split evenly over users, ceil(n / users) each, so "
                        "the total can exceed n slightly")
    p.add_argument("--n-validation", type=_count(1), default=None,
                   help="validation triplets, split like --n-train (default: ceil(N_TRAIN / 20), "
                        "the tutorial's 10M : 500k ratio)")
    p.add_argument("--holdout-baskets", type=_count(1), default=10,
                   help="most recent baskets per user held out for evaluation")
    p.add_argument("--seed", type=int, default=0, help="random seed of the triplet sampling")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it already holds a prepared dataset (runs trained from "
                        "the old one will refuse the new one)")
    p.add_argument("--feature-dtype", default=None, choices=_DTYPES,
                   help="also build the feature cache in this dtype now, reading every row "
                        "(default: none; `train` builds it in the dtype it trains with)")

    p = sub.add_parser("train", formatter_class=fmt, help="train ACF on prepared triplets")
    p.add_argument("data", help="folder written by `prepare`")
    p.add_argument("out", help="folder for checkpoints (best.pt, last.pt) and history.json")
    p.add_argument("--epochs", type=_count(1), default=None,
                   help="total epochs (default: 10; with --resume, the resumed run's own target; "
                        "a larger value trains on)")
    p.add_argument("--batch-size", type=_count(1), default=128, help="triplets per step")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=_non_negative_float, default=1e-5, help="Adam weight decay")
    p.add_argument("--loss", default="warp", choices=["warp", "sigmoid", "bpr"],
                   help="pairwise loss (the tutorial's is WARP)")
    p.add_argument("--model-dim", type=_count(1), default=128, help="embedding size D")
    p.add_argument("--max-profile-size", type=_count(1), default=9,
                   help="profile items per triplet (the tutorial's 9)")
    p.add_argument("--seed", type=int, default=0, help="parameter init and batch order")
    p.add_argument("--patience", type=_count(0), default=3,
                   help="epochs without improvement before stopping early (0 = never)")
    p.add_argument("--select-by", default="loss", choices=["loss", "auc"],
                   help="validation quantity that picks best.pt")
    p.add_argument("--val-rank-samples", type=_count(0), default=1000,
                   help="validation triplets ranked against the whole catalogue each epoch "
                        "for val_auc / val_rr (0: skip)")
    p.add_argument("--checkpoint-every", type=_count(0), default=0,
                   help="also write last.pt every N steps (0: once per epoch)")
    p.add_argument("--feature-dtype", default=None, choices=_DTYPES,
                   help="feature table dtype, 16-bit halves its memory (default: float32; with "
                        "--resume, the dtype the run was trained with)")
    p.add_argument("--max-steps", type=_count(1), default=None,
                   help="stop after this many steps in all (default: no limit)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="the fused step (11 kernels) replayed from a CUDA graph (triton backend, "
                        "one GPU); default: on exactly then")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt, up to its own epochs target unless --epochs is given")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (default: refuse to touch it)")
    _add_runtime(p, feature_dtype=False)

    p = sub.add_parser("evaluate", formatter_class=fmt, help="full-catalogue ranking metrics (tutorial + standard)")
    p.add_argument("checkpoint", help="a checkpoint written by `train` (best.pt, last.pt)")
    p.add_argument("data", help="folder written by `prepare`")
    p.add_argument("--out", default=None, help="folder for metrics.json/.csv and the PNGs")
    p.add_argument("--protocol", default="both", choices=["both", "tutorial", "standard"],
                   help="the tutorial's metrics, the standard ones, or both")
    p.add_argument("--ks", default="20,100,200", help="cutoffs for recall/precision/nDCG@k")
    p.add_argument("--memory-mb", type=_positive_float, default=256,
                   help="memory budget for one block of score rows")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG figures")
    _add_runtime(p)

    p = sub.add_parser("recommend", formatter_class=fmt, help="top-k items for users")
    p.add_argument("checkpoint", help="a checkpoint written by `train` (best.pt, last.pt)")
    p.add_argument("data", help="folder written by `prepare`")
    p.add_argument("--users", default="all", help="comma-separated user ids, or 'all'")
    p.add_argument("-k", type=_count(1), default=10, help="recommendations per user")
    p.add_argument("--include-consumed", action="store_true",
                   help="keep items the user already consumed")
    p.add_argument("--out", default=None, help=".json or .csv (default: JSON on stdout)")
    _add_runtime(p)

    p = sub.add_parser("explain", formatter_class=fmt, help="PNG of a user's attentions and recommendations")
    p.add_argument("checkpoint", help="a checkpoint written by `train` (best.pt, last.pt)")
    p.add_argument("data", help="folder written by `prepare`")
    p.add_argument("--user", type=int, required=True, help="user id (0-based, as in the files)")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("-k", type=_count(1), default=10, help="recommendations shown")
    p.add_argument("--images", default=None, help="folder with the item images (names as in the features)")
    p.add_argument("--planted", default=None, help="synthetic ground truth (planted.npz) to outline")
    p.add_argument("--exclude", default="profile", choices=["profile", "train", "none"],
                   help="items left out of the top-k (default: the profile shown, as in the tutorial)")
    _add_runtime(p)

    p = sub.add_parser("extract", formatter_class=fmt, help="ResNet50 layer4 features of an image folder (.h5)")
    p.add_argument("images", help="folder of item images")
    p.add_argument("out", help="feature file to write (.h5)")
    p.add_argument("--weights", default=None, help="local ResNet50 state dict (.pth)")
    p.add_argument("--random-weights", action="store_true", help="untrained network (testing)")
    p.add_argument("--batch-size", type=_count(1), default=16, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")

    p = sub.add_parser("demo", formatter_class=fmt, help="synth, prepare, train, evaluate, explain in a few minutes")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--epochs", type=_count(1), default=5, help="training epochs")
    p.add_argument("--n-train", type=_count(1), default=40_000, help="training triplets")
    p.add_argument("--backend", default="auto", choices=_BACKENDS, help=_BACKEND_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, sampling and training")
    sub.add_parser("info", formatter_class=fmt,
                   help="machine, ISA extensions and the cpu backend's GEMM choice (measured once)")
    for p in sub.choices.values():   # --threads after the subcommand too
        _add_threads(p)
    return ap


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k)
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be positive integers, got {text!r}")
    return ks


def _train_dtype(args) -> str:
    """--feature-dtype; with --resume, checked against (or else) the dtype of OUT/last.pt."""
    from pathlib import Path

    from ..model.checkpoint import resume_feature_dtype

    last = Path(args.out) / "last.pt"
    if args.resume and last.is_file():
        return resume_feature_dtype(last, args.feature_dtype)
    return args.feature_dtype or "float32"


def run(args) -> int:
    from ..distributed import is_main

    cmd = args.command
    if getattr(args, "device", None) is not None:
        from ..utils.devices import check_device

        check_device(args.device)      # one line for every subcommand, before any work
    if cmd == "info":
        from .info import report

        print(report())
    elif cmd == "synth":
        from ..data.synth import synth

        s = synth(args.out, n_users=args.users, n_items=args.items, n_concepts=args.concepts,
                  concepts_per_user=args.concepts_per_user, feature_dim=args.feature_dim,
                  median_interactions=args.median_interactions, noise_rate=args.noise_rate,
                  images=not args.no_images, seed=args.seed, formats=args.formats)
        print(json.dumps({k: v for k, v in s.items() if k != "config"}, indent=2))
    elif cmd == "prepare":
        from ..data.sampling import prepare

        m = prepare(args.interactions, args.features, args.out, n_train=args.n_train,
                    n_validation=args.n_validation, seed=args.seed, holdout_baskets=args.holdout_baskets,
                    overwrite=args.overwrite, feature_dtype=args.feature_dtype)
        print(json.dumps(m, indent=2))
    elif cmd == "train":
        from ..training import TrainConfig, train

        cfg = TrainConfig(data_dir=args.data, out_dir=args.out, features=args.features, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          loss=args.loss, model_dim=args.model_dim, max_profile_size=args.max_profile_size,
                          seed=args.seed, patience=args.patience, select_by=args.select_by,
                          val_rank_samples=args.val_rank_samples, checkpoint_every=args.checkpoint_every,
                          backend=args.backend, device=args.device,
                          feature_dtype=_train_dtype(args),
                          max_steps=args.max_steps, overwrite=args.overwrite,
                          num_threads=args.threads, cuda_graph=args.cuda_graph,
                          check_dataset=not args.any_dataset)
        s = train(cfg, resume=args.resume)
        if is_main():   # under torchrun, rank 0 speaks for all
            from pathlib import Path

            written = [p for p in (s["best_checkpoint"], s["last"]) if Path(p).exists()]
            best = (f"best epoch {s['best_epoch']}" if s["best_epoch"] >= 0
                    else "no epoch finished yet, so no best.pt")
            print(f"{best}; checkpoints: {', '.join(written) or 'none'}")
    elif cmd == "evaluate":
        from ..evaluation.evaluate import evaluate

        protocols = ("tutorial", "standard") if args.protocol == "both" else (args.protocol,)
        r = evaluate(args.checkpoint, args.data, args.out, features=args.features, ks=_ks(args.ks),
                     protocols=protocols, memory_mb=args.memory_mb, backend=args.backend,
                     device=args.device, plot=not args.no_plot, check_dataset=not args.any_dataset,
                     feature_dtype=args.feature_dtype)
        if args.out and is_main():
            print("written: " + ", ".join(r["files"].values()))
    elif cmd == "recommend":
        from .recommend import recommend

        recs = recommend(args.checkpoint, args.data, users=args.users, k=args.k,
                         exclude_consumed=not args.include_consumed, out=args.out,
                         features=args.features, backend=args.backend, device=args.device,
                         check_dataset=not args.any_dataset, feature_dtype=args.feature_dtype)
        if args.out is None:
            print(json.dumps({str(u): [i for i, _ in items] for u, items in recs.items()}))
        else:
            print(f"written: {args.out} ({len(recs)} users)")
    elif cmd == "explain":
        from .explain import explain

        e = explain(args.checkpoint, args.data, args.user, args.out, k=args.k, images_dir=args.images,
                    features=args.features, exclude=args.exclude,
                    planted=args.planted, backend=args.backend, device=args.device,
                    check_dataset=not args.any_dataset, feature_dtype=args.feature_dtype)
        print(f"written: {e['png']} (hits in top-{args.k}: {len(e['hits'])})")
    elif cmd == "extract":
        from .extract import extract

        path = extract(args.images, args.out, weights=args.weights, random_weights=args.random_weights,
                       batch_size=args.batch_size, device=args.device)
        print(f"written: {path}")
    elif cmd == "demo":
        from .demo import DemoConfig, run_demo

        run_demo(DemoConfig(out=args.out, epochs=args.epochs, n_train=args.n_train, backend=args.backend,
                            device=args.device, seed=args.seed))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    elif args.command == "demo":
        import torch

        # the demo's model is small: one thread avoids OpenMP overhead and contention on 2 cores
        torch.set_num_threads(1)
    clean = False
    try:
        status = run(args)
        clean = status == 0
        return status
    except USER_ERRORS as exc:
        if args.traceback:
            raise
        print(f"acf-fast: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print(f"acf-fast: {args.command} interrupted", file=sys.stderr)
        return 130
    finally:
        from ..distributed import shutdown

        shutdown(clean)   # the process group `train` / `evaluate` started under torchrun, if any


if __name__ == "__main__":
    sys.exit(main())
