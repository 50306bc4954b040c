"""The CPU backend's native ops on their own: float64 gradcheck and torch.library.opcheck."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from acf_fast.backends import cpu as cpu_backend
from acf_fast.testing import random_batch, random_model

_reason = cpu_backend._load()[1]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"cpu backend unavailable: {_reason}")

if _reason is None:
    cpu_backend.register()


def attention_inputs(dtype=torch.float64, b=4, p=3, k=5, m=4, h=6, d=5, seed=0,
                     slots=((0, 1, -1), (-1, -1, -1), (2, 2, 4), (3, -1, -1))):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    slot_item = torch.tensor(slots, dtype=torch.long)[:b, :p]
    prof = r(b, p, d) * (slot_item >= 0).unsqueeze(-1)
    return (r(k, m, h + d), r(b, h), r(b, d), r(b, p, d), prof, slot_item,
            r(h), r(1), r(d), r(1))


def test_attention_gradcheck():
    """Every input, through all three outputs (user, alpha and beta)."""
    inputs = attention_inputs()
    diff = [i for i, t in enumerate(inputs) if t.is_floating_point()]
    leaves = [t.clone().requires_grad_(i in diff) for i, t in enumerate(inputs)]

    def f(*xs):
        args = list(leaves)
        for i, x in zip(diff, xs):
            args[i] = x
        return cpu_backend.acf_attention(*args)

    assert torch.autograd.gradcheck(f, [leaves[i] for i in diff])


def test_reduce_items_gradcheck():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(7, 3, 5, generator=g, dtype=torch.float64)
    items = torch.tensor([1, 4, 6])
    w = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, b: cpu_backend.reduce_items(table, items, w, b), (w, b))
    torch.testing.assert_close(cpu_backend.reduce_items(table, items, w, b),
                               F.linear(table[items], w, b))


# (table dtype, GEMM kind): every kind on the tables it applies to; a kind that does not
# apply (a 16-bit kind on an fp16 table) runs the exact path
CHUNK_CASES = [(torch.float32, "fp32"), (torch.float16, "fp32"), (torch.bfloat16, "fp32"),
               (torch.bfloat16, "bf16"), (torch.bfloat16, "mkl-bf16"), (torch.float32, "bf16"),
               (torch.float16, "bf16")]


@pytest.mark.parametrize("table_dtype,gemm", CHUNK_CASES,
                         ids=[f"{str(t).split('.')[1]}-{k}" for t, k in CHUNK_CASES])
def test_reduce_items_chunks_and_dtypes(table_dtype, gemm):
    """More items than one gather chunk (32), each table dtype and GEMM kind, float32 out
    and gradient, against the rounding model of each kind:
    - fp32: the table widened, exact in float32;
    - mkl-bf16: table, W (forward) and dL/dR (gradient) rounded to bf16, fp32 accumulation;
    - bf16 (oneDNN): the same, and the GEMM output rounded to bf16 once more: R within one
      bf16 rounding (2^-8 relative, to cover ties) of the model, dW within one rounding of
      each chunk's share, bounded by 2^-8 |g|^T |x|."""
    from acf_fast.backends import gemm_choice

    if not torch.ops.acf_fast.reduce_gemm_available(gemm_choice.KINDS.index(gemm)):
        pytest.skip(f"this torch has no {gemm} GEMM")
    g = torch.Generator().manual_seed(2)
    table = torch.randn(90, 4, 48, generator=g).to(table_dtype)
    items = torch.randperm(90, generator=g)[:70]
    w = torch.randn(12, 48, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    out = cpu_backend.reduce_items(table, items, w, b, gemm=gemm)
    assert out.dtype == torch.float32
    rounded = gemm != "fp32" and table_dtype != torch.float16
    q = (lambda t: t.bfloat16().float()) if rounded else (lambda t: t.float())
    x = q(table[items]).reshape(-1, 48)
    wq = q(w.detach())
    prod = (x @ wq.T).reshape(out.shape)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    gq = q(grad).reshape(-1, 12)
    dw = gq.T @ x
    if gemm == "bf16" and rounded:
        bound = 2.0 ** -8 * (x.abs() @ wq.abs().T).reshape(out.shape) + 1e-5
        assert ((out.detach() - b.detach() - prod).abs() <= bound).all()
        assert ((w.grad - dw).abs() <= 2.0 ** -8 * (gq.abs().T @ x.abs()) + 1e-4).all()
        # and the output rounding did happen: not the fp32-output model
        assert (out.detach() - b.detach() - prod).abs().max() > 1e-6
    else:
        torch.testing.assert_close(out.detach(), prod + b.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(w.grad, dw, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(b.grad, grad.sum((0, 1)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_reduce_items_bf16_gemm_thread_count_invariant(table_dtype):
    """The bf16 GEMM path gives the same bits on 1 and 2 threads (fixed chunks and
    partial sums; each GEMM single-threaded), forward and W_red's gradient."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(120, 5, 64, generator=g).to(table_dtype)
    items = torch.randperm(119, generator=g)[:100] + 1
    w = torch.randn(16, 64, generator=g)
    b = torch.randn(16, generator=g)
    grad = torch.randn(100, 5, 16, generator=g)

    def both():
        out = torch.ops.acf_fast.reduce_items(table, items, w, b, 1, 1)
        return out, *torch.ops.acf_fast.reduce_items_backward(grad, table, items, w, 1)

    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = both()
        torch.set_num_threads(2)
        two = both()
    finally:
        torch.set_num_threads(saved)
    for a, c in zip(one, two):
        assert torch.equal(a, c)


def test_reduce_items_rejects_unknown_gemm():
    table, items, w, b = reduce_inputs(torch.float32, torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"gemm must be 0 \(fp32\), 1 \(bf16\) or 2"):
        torch.ops.acf_fast.reduce_items(table, items, w, b, 7, 0)
    with pytest.raises(ValueError, match="gemm must be None or one of fp32, bf16, mkl-bf16"):
        cpu_backend.reduce_items(table, items, w, b, gemm="tf32")


def test_backend_gradcheck_every_parameter():
    """float64 gradcheck of the whole cpu backend over every parameter (profiles with
    padding, an empty one, a single item and duplicates)."""
    model = random_model(n_users=4, n_items=6, m=3, f=5, d=4, backend="cpu", dtype=torch.float64)
    assert model.resolved_backend() == "cpu"
    batch = random_batch(model, batch=4, seed=2, lengths=[3, 0, 1, 4], duplicates=True)
    # w_v is never used (docs/model.md#parameters); leaving it out halves the time
    named = [(n, p) for n, p in model.named_parameters() if ".w_v." not in n]
    names = [n for n, _ in named]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in named)
    both = _ScoresAndAttentions(model)

    def f(*flat):
        return functional_call(both, {f"model.{n}": p for n, p in zip(names, flat)}, tuple(batch))

    assert torch.autograd.gradcheck(f, params, fast_mode=True)


class _ScoresAndAttentions(torch.nn.Module):
    """forward = the model's scores plus user vectors and both attentions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, user_ids, profile_ids, pos, neg, profile_mask):
        scores = self.model(user_ids, profile_ids, pos, neg, profile_mask)
        return (*scores, *self.model.user_vectors(user_ids, profile_ids, profile_mask,
                                                  return_attentions=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_attention(dtype):
    inputs = attention_inputs(dtype)
    args = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    torch.library.opcheck(torch.ops.acf_fast.acf_attention.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_attention_backward(dtype):
    """The backward op on its own (schema, fake kernel, dispatch), on what forward saves."""
    inputs = attention_inputs(dtype)
    xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1 = inputs
    user, alpha, beta = cpu_backend.acf_attention(*inputs)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=g, dtype=dtype) for t in (user, alpha, beta)]
    torch.library.opcheck(torch.ops.acf_fast.acf_attention_backward.default,
                          (*grads, xy, uc, ut, pp, prof, slot_item, w2, w1, alpha, beta))


# (table dtype, weight dtype, GEMM kind code): every table dtype under float32 and float64
# weights (float64 models keep a 16-bit table 16-bit); the 16-bit kinds (1 oneDNN bf16,
# 2 MKL bf16) only change float32 weights with a bf16 (or, for 1, float32) table, and are
# ignored (but accepted) elsewhere
REDUCE_DTYPES = [(torch.float32, torch.float32, 0), (torch.float16, torch.float32, 0),
                 (torch.bfloat16, torch.float32, 0), (torch.bfloat16, torch.float32, 1),
                 (torch.bfloat16, torch.float32, 2), (torch.float32, torch.float32, 1),
                 (torch.float64, torch.float64, 0), (torch.float32, torch.float64, 0),
                 (torch.float16, torch.float64, 0), (torch.bfloat16, torch.float64, 1)]
REDUCE_IDS = [f"{str(t).split('.')[1]}-{str(w).split('.')[1]}-gemm{gemm}"
              for t, w, gemm in REDUCE_DTYPES]


def reduce_inputs(table_dtype, weight_dtype, requires_grad):
    g = torch.Generator().manual_seed(4)
    table = torch.randn(9, 3, 8, generator=g).to(table_dtype)
    items = torch.tensor([2, 5, 8])
    w = torch.randn(4, 8, generator=g, dtype=weight_dtype, requires_grad=requires_grad)
    b = torch.randn(4, generator=g, dtype=weight_dtype, requires_grad=requires_grad)
    return table, items, w, b


@pytest.mark.parametrize("table_dtype,weight_dtype,gemm", REDUCE_DTYPES, ids=REDUCE_IDS)
def test_opcheck_reduce_items(table_dtype, weight_dtype, gemm):
    table, items, w, b = reduce_inputs(table_dtype, weight_dtype, requires_grad=True)
    out = torch.ops.acf_fast.reduce_items(table, items, w, b, gemm, gemm)
    assert out.dtype == weight_dtype
    torch.library.opcheck(torch.ops.acf_fast.reduce_items.default, (table, items, w, b, gemm, gemm))


@pytest.mark.parametrize("table_dtype,weight_dtype,gemm", REDUCE_DTYPES, ids=REDUCE_IDS)
def test_opcheck_reduce_items_backward(table_dtype, weight_dtype, gemm):
    table, items, w, _ = reduce_inputs(table_dtype, weight_dtype, requires_grad=False)
    grad = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(5), dtype=weight_dtype)
    dw, db = torch.ops.acf_fast.reduce_items_backward(grad, table, items, w, gemm)
    assert dw.dtype == db.dtype == weight_dtype
    torch.library.opcheck(torch.ops.acf_fast.reduce_items_backward.default,
                          (grad, table, items, w, gemm))
