"""`acf-fast` / `python -m acf_fast`: every pipeline step as a subcommand.

    acf-fast synth     OUT [--users N --items N --feature-dim F ...]
    acf-fast prepare   INTERACTIONS FEATURES OUT [--n-train N --n-validation N --seed 0]
    acf-fast train     DATA OUT [--epochs 10 --loss warp --lr 1e-3 --resume ...]
    acf-fast evaluate  CHECKPOINT DATA [--out DIR]
    acf-fast recommend CHECKPOINT DATA [--users 1,2,3 | all] [-k 10] [--out recs.json]
    acf-fast explain   CHECKPOINT DATA --user U --out fig.png [--images DIR]
    acf-fast extract   IMAGES OUT.h5 --weights resnet50.pth
    acf-fast demo      [--out demo_out]

Bad input (missing files or columns, unknown ids, mismatched feature files) ends
with one line `acf-fast: error: ...` and exit status 2; `--traceback` shows more.
"""

from __future__ import annotations

import argparse
import json
import sys

from .data.synth import SynthConfig


def _add_runtime(p):
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--features", default=None, help="feature file (default: the one `prepare` used)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="acf-fast", description="Attentive Collaborative Filtering pipeline")
    ap.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; the demo uses 1)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic Wikimedia-shaped dataset")
    p.add_argument("out")
    d = SynthConfig()
    p.add_argument("--users", type=int, default=d.n_users)
    p.add_argument("--items", type=int, default=d.n_items)
    p.add_argument("--concepts", type=int, default=d.n_concepts)
    p.add_argument("--concepts-per-user", type=int, default=d.concepts_per_user)
    p.add_argument("--feature-dim", type=int, default=d.feature_dim)
    p.add_argument("--median-interactions", type=float, default=d.median_interactions)
    p.add_argument("--noise-rate", type=float, default=d.noise_rate)
    p.add_argument("--no-images", action="store_true")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("prepare", help="the tutorial's sampling: triplets + evaluation file")
    p.add_argument("interactions")
    p.add_argument("features")
    p.add_argument("out")
    p.add_argument("--n-train", type=int, default=10_000_000)
    p.add_argument("--n-validation", type=int, default=500_000)
    p.add_argument("--holdout-baskets", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="train ACF on prepared triplets")
    p.add_argument("data", help="folder written by `prepare`")
    p.add_argument("out", help="folder for checkpoints (best.pt, last.pt) and history.jsonl")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--loss", default="warp", choices=["warp", "sigmoid", "bpr"])
    p.add_argument("--model-dim", type=int, default=128)
    p.add_argument("--max-profile-size", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patience", type=int, default=3, help="early stopping (0 = off)")
    p.add_argument("--select-by", default="loss", choices=["loss", "auc"])
    p.add_argument("--val-rank-samples", type=int, default=1000)
    p.add_argument("--checkpoint-every", type=int, default=0, help="also write last.pt every N steps")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    _add_runtime(p)

    p = sub.add_parser("evaluate", help="full-catalogue ranking metrics (tutorial + standard)")
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--out", default=None, help="folder for metrics.json/.csv and the PNGs")
    p.add_argument("--protocol", default="both", choices=["both", "tutorial", "standard"])
    p.add_argument("--ks", default="20,100,200")
    p.add_argument("--memory-mb", type=float, default=256)
    p.add_argument("--no-plot", action="store_true")
    _add_runtime(p)

    p = sub.add_parser("recommend", help="top-k items for users")
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--users", default="all", help="comma-separated user ids, or 'all'")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--include-consumed", action="store_true")
    p.add_argument("--out", default=None, help=".json or .csv (default: JSON on stdout)")
    _add_runtime(p)

    p = sub.add_parser("explain", help="PNG of a user's attentions and recommendations")
    p.add_argument("checkpoint")
    p.add_argument("data")
    p.add_argument("--user", type=int, required=True)
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--images", default=None, help="folder with the item images (names as in the features)")
    p.add_argument("--planted", default=None, help="synthetic ground truth (planted.npz) to outline")
    p.add_argument("--exclude", default="profile", choices=["profile", "train", "none"],
                   help="items left out of the top-k (default: the profile shown, as in the tutorial)")
    _add_runtime(p)

    p = sub.add_parser("extract", help="ResNet50 layer4 features of an image folder (.h5)")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--weights", default=None, help="local ResNet50 state dict (.pth)")
    p.add_argument("--random-weights", action="store_true", help="untrained network (testing)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("demo", help="synth, prepare, train, evaluate, explain in a few minutes")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--n-train", type=int, default=40_000)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return ap


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k)
    except ValueError:
        raise ValueError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be positive integers, got {text!r}")
    return ks


def run(args) -> int:
    from .distributed import is_main

    cmd = args.command
    if cmd == "synth":
        from .data.synth import synth

        s = synth(args.out, n_users=args.users, n_items=args.items, n_concepts=args.concepts,
                  concepts_per_user=args.concepts_per_user, feature_dim=args.feature_dim,
                  median_interactions=args.median_interactions, noise_rate=args.noise_rate,
                  images=not args.no_images, seed=args.seed)
        print(json.dumps({k: v for k, v in s.items() if k != "config"}, indent=2))
    elif cmd == "prepare":
        from .data.sampling import prepare

        m = prepare(args.interactions, args.features, args.out, n_train=args.n_train,
                    n_validation=args.n_validation, seed=args.seed, holdout_baskets=args.holdout_baskets)
        print(json.dumps(m, indent=2))
    elif cmd == "train":
        from .train import TrainConfig, train

        cfg = TrainConfig(data_dir=args.data, out_dir=args.out, features=args.features, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          loss=args.loss, model_dim=args.model_dim, max_profile_size=args.max_profile_size,
                          seed=args.seed, patience=args.patience, select_by=args.select_by,
                          val_rank_samples=args.val_rank_samples, checkpoint_every=args.checkpoint_every,
                          backend=args.backend, device=args.device, feature_dtype=args.feature_dtype,
                          max_steps=args.max_steps)
        s = train(cfg, resume=args.resume)
        if is_main():   # under torchrun, rank 0 speaks for all
            print(f"best epoch {s['best_epoch']}; checkpoints: {s['best_checkpoint']}, {s['last']}")
    elif cmd == "evaluate":
        from .evaluate import evaluate

        protocols = ("tutorial", "standard") if args.protocol == "both" else (args.protocol,)
        r = evaluate(args.checkpoint, args.data, args.out, features=args.features, ks=_ks(args.ks),
                     protocols=protocols, memory_mb=args.memory_mb, backend=args.backend,
                     device=args.device, plot=not args.no_plot)
        if args.out and is_main():
            print("written: " + ", ".join(r["files"].values()))
    elif cmd == "recommend":
        from .recommend import recommend

        recs = recommend(args.checkpoint, args.data, users=args.users, k=args.k,
                         exclude_consumed=not args.include_consumed, out=args.out,
                         features=args.features, backend=args.backend, device=args.device)
        if args.out is None:
            print(json.dumps({str(u): [i for i, _ in items] for u, items in recs.items()}))
        else:
            print(f"written: {args.out} ({len(recs)} users)")
    elif cmd == "explain":
        from .explain import explain

        e = explain(args.checkpoint, args.data, args.user, args.out, k=args.k, images_dir=args.images,
                    features=args.features, exclude=args.exclude,
                    planted=args.planted, backend=args.backend, device=args.device)
        print(f"written: {e['png']} (hits in top-{args.k}: {len(e['hits'])})")
    elif cmd == "extract":
        from .extract import extract

        path = extract(args.images, args.out, weights=args.weights, random_weights=args.random_weights,
                       batch_size=args.batch_size, device=args.device)
        print(f"written: {path}")
    elif cmd == "demo":
        from .pipeline import DemoConfig, run_demo

        run_demo(DemoConfig(out=args.out, epochs=args.epochs, n_train=args.n_train, backend=args.backend,
                            device=args.device, seed=args.seed))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    elif args.command == "demo":
        import torch

        # the demo's model is small: one thread avoids OpenMP overhead and contention on 2 cores
        torch.set_num_threads(1)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as exc:
        if args.traceback:
            raise
        print(f"acf-fast: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from .distributed import shutdown

        shutdown()   # the process group `train` / `evaluate` started under torchrun, if any


if __name__ == "__main__":
    sys.exit(main())
