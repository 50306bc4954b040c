"""Bad input at the public boundary gets a clear TypeError/ValueError, never a crash or NaN."""

import pytest
import torch

from acf_fast import ACF
from acf_fast.testing import random_batch, random_model


@pytest.fixture(scope="module")
def model():
    return random_model(n_users=4, n_items=10, d=8, f=6, m=4)


def call(model, **override):
    b = random_batch(model, batch=3, lengths=[2, 1, 0])
    args = dict(user_ids=b.user_ids, profile_ids=b.profile_ids, pos=b.pos, neg=b.neg,
                profile_mask=b.profile_mask)
    args.update(override)
    return model(**args)


@pytest.mark.parametrize("override, error, message", [
    (dict(user_ids=torch.tensor([0, 1, 4])), ValueError, r"user_ids contains id 4, expected ids in \[0, 3\]"),
    (dict(user_ids=torch.tensor([0, -1, 2])), ValueError, "user_ids contains id -1"),
    (dict(pos=torch.tensor([1, 2, 11])), ValueError, r"pos contains id 11, expected ids in \[1, 10\]"),
    (dict(pos=torch.tensor([1, 0, 2])), ValueError, r"pos contains id 0, expected ids in \[1, 10\]"),
    (dict(neg=torch.tensor([3, 2, 0])), ValueError, r"neg contains id 0, expected ids in \[1, 10\]"),
    (dict(neg=torch.tensor([-3, 2, 1])), ValueError, "neg contains id -3"),
    (dict(profile_ids=torch.tensor([[1, 12], [0, 0], [0, 0]])), ValueError, "profile_ids contains id 12"),
    (dict(user_ids=torch.tensor([0.0, 1.0, 2.0])), TypeError, "user_ids must be an int64 or int32"),
    (dict(user_ids=[0, 1, 2]), TypeError, "user_ids must be a torch.Tensor"),
    (dict(profile_ids=torch.tensor([1, 2, 3])), ValueError, "profile_ids must have 2 dimension"),
    (dict(pos=torch.tensor([1, 2])), ValueError, "same length"),
    (dict(profile_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "profile_mask has shape"),
    (dict(profile_mask=torch.ones(3, 2)), TypeError, "profile_mask must be bool"),
])
def test_bad_batches(model, override, error, message):
    with pytest.raises(error, match=message):
        call(model, **override)


def test_mask_disagreeing_with_padding(model):
    b = random_batch(model, batch=2, lengths=[2, 1])
    with pytest.raises(ValueError, match="disagrees with profile_ids"):
        model(b.user_ids, b.profile_ids, b.pos, b.neg, torch.ones_like(b.profile_mask))


def test_integer_mask_and_int32_ids_are_accepted(model):
    b = random_batch(model, batch=3, lengths=[2, 1, 0])
    want = model(*b)
    got = model(b.user_ids.int(), b.profile_ids.int(), b.pos.int(), b.neg.int(), b.profile_mask.int())
    torch.testing.assert_close(got, want)


def test_non_contiguous_inputs(model):
    b = random_batch(model, batch=4, lengths=[2, 1, 0, 2])
    prof = b.profile_ids.T.contiguous().T  # same values, transposed strides
    assert not prof.is_contiguous()
    torch.testing.assert_close(model(b.user_ids, prof, b.pos, b.neg), model(*b))


def test_constructor_errors():
    with pytest.raises(ValueError, match="exactly one of"):
        ACF(3, 5)
    with pytest.raises(ValueError, match="unknown backend"):
        ACF(3, 5, features=torch.rand(5, 49, 4), backend="cuda-magic")
    with pytest.raises(ValueError, match="input_feature_dim=8 but the features have 4"):
        ACF(3, 5, features=torch.rand(5, 49, 4), input_feature_dim=8)
    with pytest.raises(TypeError, match="floating-point"):
        ACF(3, 5, features=torch.ones(5, 49, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="negative id"):
        ACF([0, -1], 5, features=torch.rand(5, 49, 4))


def test_recommend_batch_bad_k(model):
    b = random_batch(model, batch=2)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        model.recommend_batch(b.user_ids, b.profile_ids, k=11)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backends_refuse_16bit_parameters(backend, dtype):
    from acf_fast.backends.registry import cpu_extension_available, triton_interpreter_on
    if backend == "cpu" and not cpu_extension_available():
        pytest.skip("cpu backend: the native extension is not built")
    if backend == "triton":
        pytest.importorskip("triton")
        if not triton_interpreter_on():
            pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    m = random_model(n_users=4, n_items=10, d=8, f=6, m=4, backend=backend).to(dtype)
    with pytest.raises(ValueError, match=rf"{backend} backend needs float32 or float64 "
                                         rf"parameters .all the same., got \['{dtype}'\]"):
        call(m)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(model_dim=0), ValueError, "model_dim must be a positive integer, got 0"),
    (dict(model_dim=8.9), TypeError, "model_dim must be an int, got float 8.9"),
    (dict(users=5.5), TypeError, "users must be a count .int. or a list"),
    (dict(users="5"), TypeError, "users must be a count"),
    (dict(items=[0, 1.5]), TypeError, "items must hold integer ids"),
    (dict(items=[-1, 3]), ValueError, "items contains a negative id"),
    (dict(features=torch.zeros(0, 4, 6)), ValueError, "features has no items"),
])
def test_constructor_refuses_bad_arguments(kwargs, error, message):
    args = dict(users=4, items=10, features=torch.randn(10, 4, 6), model_dim=8)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        ACF(args.pop("users"), args.pop("items"), **args)


def test_recommend_batch_exclusions(model):
    b = random_batch(model, batch=2, lengths=[2, 1])
    everything = torch.arange(1, 11).expand(2, -1).clone()
    everything[0, :3] = 0                      # user 0 keeps items 1..3, user 1 none
    scores, items = model.recommend_batch(b.user_ids, b.profile_ids, k=5, exclude=everything)
    assert sorted(items[0, :3].tolist()) == [1, 2, 3] and torch.isfinite(scores[0, :3]).all()
    assert (items[0, 3:] == 0).all() and (scores[0, 3:] == float("-inf")).all()
    assert (items[1] == 0).all() and (scores[1] == float("-inf")).all()
    for bad, message in [(torch.tensor([[11], [1]]), "exclude contains item id 11"),
                         (torch.tensor([[-5], [1]]), "exclude contains item id -5"),
                         (torch.tensor([1, 2]), "exclude must be \\[2, E\\]")]:
        with pytest.raises(ValueError, match=message):
            model.recommend_batch(b.user_ids, b.profile_ids, k=3, exclude=bad)


def test_recommend_all_refuses_a_diverged_model():
    m = random_model(n_users=4, n_items=10, d=8, f=6, m=4)
    with torch.no_grad():
        m.user_model.user_embedding.weight[1, 0] = float("nan")
    b = random_batch(m, batch=2, lengths=[2, 1])
    with pytest.raises(ValueError, match="user vectors or item embeddings are not finite"):
        m.recommend_all(torch.tensor([0, 1]), b.profile_ids)
    m = random_model(n_users=4, n_items=10, d=8, f=6, m=4)
    with torch.no_grad():
        m.item_model.weight[7, 2] = float("inf")
    with pytest.raises(ValueError, match="item embeddings are not finite"):
        m.recommend_batch(torch.tensor([0, 1]), b.profile_ids, k=3)


# ---------------------------------------------------------------------------- Reliability II, item 7
def test_recommend_batch_accepts_exclude_as_python_lists(model):
    import numpy as np

    b = random_batch(model, batch=3, lengths=[2, 1, 0])
    as_tensor = torch.tensor([[1, 2], [3, 0], [0, 0]])
    want = model.recommend_batch(b.user_ids, b.profile_ids, k=4, exclude=as_tensor)
    for given in ([[1, 2], [3, 0], [0, 0]], [[1, 2], [3], []], ((1, 2), (3,), ()),
                  np.array([[1, 2], [3, 0], [0, 0]])):
        got = model.recommend_batch(b.user_ids, b.profile_ids, k=4, exclude=given)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), given
    scores = model.recommend_batch(b.user_ids, b.profile_ids, exclude=[[1, 2], [3], []])
    assert torch.equal(scores, model.recommend_batch(b.user_ids, b.profile_ids, exclude=as_tensor))
    assert scores[0, :2].eq(float("-inf")).all() and scores[1, 2] == float("-inf")


@pytest.mark.parametrize("bad, error, message", [
    ("1,2,3", TypeError, r"exclude must be item ids: a \[3, E\] tensor or array, or one list of ids per user"),
    ([["a"], [], []], TypeError, "exclude must be item ids"),
    ({0: [1]}, TypeError, "exclude must be item ids.*got dict"),
    ([[1.5], [2.0], []], TypeError, "exclude must hold integer item ids, got torch.float32"),
    ([1, 2, 3], ValueError, r"exclude must be \[3, E\] item ids, got shape \(3,\)"),
    ([[1], [2]], ValueError, r"exclude must be \[3, E\] item ids, got shape \(2, 1\)"),
    ([[11], [], []], ValueError, "exclude contains item id 11"),
])
def test_recommend_batch_refuses_bad_exclude_naming_it(model, bad, error, message):
    b = random_batch(model, batch=3, lengths=[2, 1, 0])
    with pytest.raises(error, match=message):
        model.recommend_batch(b.user_ids, b.profile_ids, k=3, exclude=bad)


def test_recommend_batch_in_blocks_of_users_matches_one_block(model, monkeypatch):
    import acf_fast.model.scoring as scoring

    b = random_batch(model, batch=5, lengths=[2, 1, 0, 3, 2])
    excl = torch.tensor([[1, 0], [2, 3], [0, 0], [4, 0], [5, 6]])
    cases = [dict(), dict(k=3), dict(k=3, exclude=excl), dict(exclude=excl),
             dict(return_attentions=True), dict(k=2, exclude=excl, return_attentions=True)]
    for kw in cases:
        whole = model.recommend_batch(b.user_ids, b.profile_ids, **kw)
        for block in (1, 2):
            torch.testing.assert_close(model.recommend_batch(b.user_ids, b.profile_ids,
                                                             block_users=block, **kw), whole)
        with monkeypatch.context() as m:       # the default block size follows a memory budget
            m.setattr(scoring, "BLOCK_BYTES", 1)
            assert scoring.user_block_size(model, b.profile_ids.shape[1], 65536) == 1
            torch.testing.assert_close(model.recommend_batch(b.user_ids, b.profile_ids, **kw), whole)
    with monkeypatch.context() as m:           # recommend_all for several users goes through it
        m.setattr(scoring, "BLOCK_BYTES", 1)
        torch.testing.assert_close(model.recommend_all(b.user_ids, b.profile_ids),
                                   model.recommend_batch(b.user_ids, b.profile_ids))
    with pytest.raises(ValueError, match="block_users must be >= 1"):
        model.recommend_batch(b.user_ids, b.profile_ids, block_users=-1)
