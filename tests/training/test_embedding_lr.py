"""`embedding_lr` (the demo's short runs): the user, item and profile embeddings get their
own Adam rate, every other parameter keeps `lr`; unset, one group as before (so runs
written before the option resume)."""

import pytest
import torch

from acf_fast.model.acf import ACF
from acf_fast.training.config import TrainConfig, parameter_groups


@pytest.mark.parametrize("tied", [True, False])
def test_embeddings_apart_everything_else_at_lr(tied):
    model = ACF(5, 7, features=torch.rand(8, 49, 4), model_dim=4, tied_item_embedding=tied)
    emb, rest = parameter_groups(model, TrainConfig("d", "o", embedding_lr=0.01))
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in emb["params"]) == sorted(
        ["item_model.weight", "user_model.user_embedding.weight"]
        + ([] if tied else ["user_model.profile_embedding.weight"]))
    assert emb["lr"] == 0.01 and "lr" not in rest
    assert len(emb["params"]) + len(rest["params"]) == len(list(model.parameters()))
    opt = torch.optim.Adam(parameter_groups(model, TrainConfig("d", "o", embedding_lr=0.01)), lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 1e-3]


def test_unset_is_one_group_and_bad_values_are_refused():
    model = ACF(5, 7, features=torch.rand(8, 49, 4), model_dim=4)
    (only,) = parameter_groups(model, TrainConfig("d", "o"))
    assert len(only["params"]) == len(list(model.parameters()))
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="embedding_lr"):
            TrainConfig("d", "o", embedding_lr=bad).validate()
