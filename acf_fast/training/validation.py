"""Validation after each epoch: the loss on the validation triplets, and the AUC and RR
of their positive items ranked among all items on a fixed subset of them.

Under torchrun the work is dealt out in whole batches (loss) and whole blocks (ranking)
and gathered back in single-process order, so every rank gets exactly the numbers one
process computes (docs/distributed.md#metrics).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import distributed
from ..data.formats import TripletSet
from ..evaluation.metrics import ranking_metrics
from ..model.scoring import rank_targets, score_catalogue
from ..utils.progress import bar as tqdm
from .sampler import batch_tensors

RANK_BLOCK = 256           # validation triplets ranked against the catalogue at once
# the progress line's names for the ranking numbers (history.json keeps val_auc / val_rr),
# and the legend printed once before the first epoch line that has them
LOG_NAMES = {"val_auc": "val_auc_triplets", "val_rr": "val_rr_triplets"}
LEGEND = ("val_auc_triplets / val_rr_triplets (val_auc / val_rr in history.json): validation "
          "triplets (a fixed subset of --val-rank-samples), the positive item ranked against the "
          "whole catalogue, the user's profile excluded; not the held-out-basket AUC that "
          "`acf-fast evaluate` reports")


@torch.no_grad()
def validate(model, loss_fn, data: TripletSet | None, batch_size: int, rank_samples: int,
             seed: int, n_items: int, ctx: distributed.DistContext, progress: bool = False) -> dict:
    """{"val_loss", "val_auc", "val_rr"} (the last two when rank_samples > 0); {} without
    validation triplets. `model` is put in eval mode meanwhile. progress: a bar over the
    triplets (the loss's, then the ranked ones): 500k of them take about a minute on a CPU."""
    if data is None or len(data) == 0:
        return {}
    model.eval()
    total = len(data) + min(rank_samples, len(data))
    with tqdm(total=total, desc="validation", unit="triplet", disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        out = {"val_loss": validation_loss(model, loss_fn, data, batch_size, ctx, bar)}
        out.update(validation_ranking(model, data, rank_samples, seed, n_items, ctx.device, bar))
    model.train()
    return out


@torch.no_grad()
def validation_loss(model, loss_fn, data: TripletSet, batch_size: int,
                    ctx: distributed.DistContext, bar=None) -> float:
    """The mean loss over `data` in batches of `batch_size`, as one process sums it."""
    starts = range(0, len(data), batch_size)
    mine = range(ctx.rank, len(starts), ctx.world_size)   # whole batches per rank
    sums = []
    for b in mine:
        idx = torch.arange(starts[b], min(starts[b] + batch_size, len(data)))
        ps, ns = model(*batch_tensors(data, idx, ctx.device))
        sums.append(float(loss_fn(ps, ns)) * idx.numel())
        if bar is not None:   # rank 0's share, times the ranks: the bar ends at the total
            bar.update(idx.numel() * ctx.world_size)
    # summed in batch order, as one process does: the same value on every rank
    total = sum(distributed.gather_ordered(sums, list(mine), len(starts)))
    return total / len(data)


@torch.no_grad()
def validation_ranking(model, data: TripletSet, samples: int, seed: int, n_items: int,
                       device: torch.device, bar=None) -> dict:
    """AUC and RR of pi among all items (profile excluded) on a fixed subset of `samples`
    validation triplets (NaN when a score is not finite)."""
    n = min(samples, len(data))
    if n == 0:
        return {}
    gen = torch.Generator().manual_seed(seed + 17)
    pick = torch.randperm(len(data), generator=gen)[:n]
    ranks, positions = [np.zeros((0, 1), dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    finite = [np.zeros(0, dtype=bool)]
    for s, e in distributed.shard_blocks(n, RANK_BLOCK):   # blocks dealt to ranks, then gathered
        u, p, pos, _ = batch_tensors(data, pick[s:e], device)
        # the scores model.recommend_all gives, without its exception for non-finite user
        # vectors: a rank that raised alone would leave the others waiting in gather_rows
        user = model.user_vectors(u, p)[0]
        scores = score_catalogue(user, model.item_model.weight, model.all_items, model.model_dim)
        # a NaN score compares false with everything: it would rank first (AUC 1)
        finite.append(torch.isfinite(scores).all(1).cpu().numpy())
        ranks.append(rank_targets(scores, model.all_items, pos[:, None], exclude=p).cpu().numpy())
        positions.append(np.arange(s, e))
        if bar is not None:
            bar.update((e - s) * distributed.context().world_size)
    rows = distributed.gather_rows({"rank": np.concatenate(ranks), "finite": np.concatenate(finite)},
                                   np.concatenate(positions), n)
    if not rows["finite"].all():
        return {"val_auc": float("nan"), "val_rr": float("nan")}
    m = ranking_metrics(rows["rank"], np.ones(n), n_items, ks=(20,))
    return {"val_auc": float(m["AUC"].mean()), "val_rr": float(m["RR"].mean())}
