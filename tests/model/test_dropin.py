"""`from acf_fast import ACF` in the tutorial's code: its constructor, attributes, args(),
from_checkpoint and recommend_all calls, made here the way the tutorial makes them
(tests/model/test_tutorial_compat.py checks the values against an independent oracle)."""

import io

import h5py
import numpy as np
import pytest
import torch

from acf_fast import ACF
from acf_fast.model.checkpoint import make_checkpoint

N, F = 10, 6


def grids(seed=0):
    return np.random.default_rng(seed).standard_normal((N, F, 7, 7)).astype(np.float32)


@pytest.fixture
def files(tmp_path):
    """The tutorial's two feature files for the same items, side by side."""
    g = grids()
    arr = np.empty((N, 2), dtype=object)
    for i in range(N):
        arr[i] = [f"{i}.jpg", g[i]]
    np.save(tmp_path / "emb.npy", arr, allow_pickle=True)
    with h5py.File(tmp_path / "emb.h5", "w") as fh:
        fh["image_filenames"] = np.array([f"{i}.jpg".encode() for i in range(N)])
        fh["resnet50/layer4"] = g
    return tmp_path


def dataset_ids():
    """What the tutorial's UserProfileModeDataset hands ACF: np.unique of its columns,
    users 0-based, items shifted to 1-based."""
    ui = np.array([3, 0, 1, 3, 2, 1])
    items = np.unique(np.concatenate([np.array([1, 4, 2, 9]), np.array([0, 5, 7, 8, 3, 6])]) + 1)
    return np.unique(ui), items


def test_the_tutorials_constructor_call_and_attributes(files):
    users, items = dataset_ids()
    device = torch.device("cpu")
    # positionally, every argument the tutorial's ACF takes, with its meaning
    model = ACF(users, items, str(files / "emb.npy"), 8, 0, True, device, False).to(device)
    assert model.users == [0, 1, 2, 3] and model.items == list(range(1, N + 1))
    assert torch.equal(model.all_items, torch.arange(1, N + 1))
    assert model.feature_path == str(files / "emb.npy") and not model.using_h5
    assert (model.model_dim, model.input_feature_dim, model.pad_token) == (8, F, 0)
    assert model.device == device and model.num_users == 4 and model.num_items == N
    assert model.feature_data.shape == (N + 1, 7, 7, F)
    assert torch.equal(model.get_features(torch.tensor([[3, 0]]))[0, 0],
                       torch.from_numpy(grids()[2]).permute(1, 2, 0))
    assert torch.equal(model.get_features(0), torch.zeros(1, 7, 7, F))


def test_zero_based_and_partial_item_lists_mean_what_they_mean_in_the_tutorial():
    feats = torch.rand(N, 49, 4)
    zero_based = ACF([0, 1], list(range(N)), features=feats)
    assert torch.equal(zero_based.all_items, torch.arange(1, N + 1))        # shifted to 1..N
    partial = ACF([0, 1], [2, 5, 7], features=feats)                       # a catalogue subset
    assert torch.equal(partial.all_items, torch.tensor([2, 5, 7]))
    scores = partial.recommend_all(torch.tensor([1]), torch.tensor([[2, 5]]))
    assert scores.shape == (3,)                                             # column c = all_items[c]


def test_force_h5_reads_the_h5_file_next_to_feature_path(files):
    (files / "emb.npy").unlink()                  # the tutorial's force_h5 needs only the .h5
    model = ACF(list(range(3)), list(range(N)), str(files / "emb.npy"), model_dim=4, force_h5=True)
    assert model.feature_path == str(files / "emb.h5") and model.using_h5
    assert model.args()["feature_path"] == str(files / "emb.h5")
    want = torch.cat([torch.zeros(1, 49, F), torch.from_numpy(grids()).flatten(2).transpose(1, 2)])
    torch.testing.assert_close(model.feature_table, want)
    ckpt = {"model_args": {**model.args(), "feature_path": str(files / "emb.npy")},
            "state_dict": model.state_dict()}
    again = ACF.from_checkpoint(ckpt, None, True)              # (checkpoint, device, force_h5)
    assert again.using_h5 and again.feature_path == str(files / "emb.h5")


def test_args_are_plain_python_for_counts_and_id_lists(files):
    feats = torch.rand(N, 49, 4)
    from_counts = ACF(4, N, features=feats, model_dim=4)     # how `acf-fast train` builds it
    args = from_counts.args()
    assert args == {"users": [0, 1, 2, 3], "items": list(range(1, N + 1)), "feature_path": None,
                    "model_dim": 4, "input_feature_dim": 4, "tied_item_embedding": True}
    users, items = dataset_ids()
    from_lists = ACF(torch.from_numpy(users), items, str(files / "emb.npy"), model_dim=4)
    args = from_lists.args()
    assert args["users"] == [0, 1, 2, 3] and args["items"] == list(range(1, N + 1))
    assert all(type(i) is int for i in args["users"] + args["items"])
    buf = io.BytesIO()
    torch.save(make_checkpoint(from_lists, torch.optim.Adam(from_lists.parameters())), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)                # torch's default since 2.6
    assert ckpt["model_args"] == from_lists.args()
    again = ACF.from_checkpoint(ckpt)
    assert again.args() == from_lists.args()


def test_recommend_all_for_several_users_is_batched_in_the_tutorials_order():
    feats = torch.rand(N, 49, 4)
    torch.manual_seed(0)
    model = ACF(4, N, features=feats, model_dim=4).eval()
    users, profiles = torch.tensor([0, 3, 1]), torch.tensor([[1, 2, 0], [4, 0, 0], [7, 8, 9]])
    scores, component, profile = model.recommend_all(users, profiles, return_attentions=True)
    assert (scores.shape, component.shape, profile.shape) == ((3, N), (3, 3, 49), (3, 3))
    b_scores, b_component, b_profile = model.recommend_batch(users, profiles, return_attentions=True)
    assert torch.equal(scores, b_scores) and torch.equal(profile, b_profile)
    padded = profiles == 0
    assert torch.equal(component[~padded], b_component[~padded])
    assert (component[padded] == 1 / 49).all() and (b_component[padded] == 0).all()
    assert torch.equal(model.recommend_all(users, profiles), scores)
    for b in range(3):                       # one user at a time: the tutorial's shapes
        one = model.recommend_all(users[b:b + 1], profiles[b:b + 1], return_attentions=True)
        assert [x.shape for x in one] == [(N,), (3, 49), (1, 3)]
        torch.testing.assert_close(one[0], scores[b])
        torch.testing.assert_close(one[1], component[b])
    torch.testing.assert_close(model.recommend_all(torch.tensor(3), profiles[1:2]), scores[1])


@pytest.mark.filterwarnings("ignore:The use of `x.T`")  # notebook 5's .T on a 1-D tensor
def test_notebook_style_calls(files):
    """Notebook 4's evaluation call and notebook 5's attention cells, as plain code."""
    torch.manual_seed(1)
    model = ACF(list(range(4)), list(range(N)), str(files / "emb.npy"), model_dim=8)
    model = ACF.from_checkpoint(make_checkpoint(model), device=torch.device("cpu"))
    model.eval()
    profile = torch.tensor([4, 0, 7]).unsqueeze(0)            # 0-based, as the CSV holds them
    user_id = torch.tensor([2])
    scores = model.recommend_all(user_id, profile + 1).squeeze()
    assert scores.shape == (N,)
    ranking = torch.argsort(scores, descending=True)          # positions are 0-based item ids
    assert sorted(ranking.tolist()) == list(range(N))

    scores, *attns = model.recommend_all(user_id, profile + 1, return_attentions=True)
    component_attns, profile_attns = attns
    assert scores.shape == (N,)
    component = component_attns.squeeze()
    attn = dict(zip(profile.flatten().tolist(), profile_attns.squeeze().T.tolist()))
    assert list(attn) == [4, 0, 7] and all(isinstance(a, float) for a in attn.values())
    assert abs(sum(attn.values()) - 1) < 1e-6
    grid = component[0].reshape((7, 7)).detach().cpu().numpy()
    assert grid.shape == (7, 7) and abs(grid.sum() - 1) < 1e-5


def test_the_batched_method_adds_topk_exclusions_and_blocks():
    torch.manual_seed(0)
    model = ACF(3, N, features=torch.rand(N, 49, 4), model_dim=4).eval()
    users, profiles = torch.tensor([0, 2]), torch.tensor([[1, 2], [3, 0]])
    scores = model.recommend_batch(users, profiles)
    (top_s, top_i), component, profile = model.recommend_batch(
        users, profiles, k=3, exclude=profiles, return_attentions=True, block_items=4)
    masked = scores.clone()
    masked[0, [0, 1]] = masked[1, 2] = float("-inf")
    ref = masked.topk(3, dim=1)
    torch.testing.assert_close(top_s, ref.values)
    assert torch.equal(top_i, ref.indices + 1)
    assert component.shape == (2, 2, 49) and profile.shape == (2, 2)
    with pytest.raises(TypeError, match="k, exclude: use recommend_batch"):
        model.recommend_all(users, profiles, k=3, exclude=profiles)  # not the tutorial's call
