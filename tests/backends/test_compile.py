"""A training step of the cpu backend under torch.compile: one graph, no graph breaks, a
backward compiled as one graph, the eager step's numbers, the checks still raising, and
no recompilation for each new batch size (issue 18, item 4).

Small shapes throughout: what is pinned is the structure of the compiled step, not its
speed (benchmarks/ times it at the Wikimedia shape).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop

from acf_fast.backends import cpu as cpu_backend
from acf_fast.model.losses import warp_loss
from acf_fast.testing import random_batch, random_model, same_model

_reason = cpu_backend._load()[1]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"cpu backend unavailable: {_reason}")

SHAPE = dict(n_users=16, n_items=40, m=4, f=8, d=8)

# Run in a fresh interpreter: the first compiled call of a process is the one that has to
# trace the backend's set-up (importing it, loading the extension, registering the fakes),
# which a test in a warm process would have done eagerly long before.
EXPLAIN = """
import json, warnings
import torch, torch._dynamo
from acf_fast.model.losses import warp_loss
from acf_fast.testing import random_batch, random_model

warnings.simplefilter("ignore")
model = random_model(**SHAPE, backend="cpu")
batch = random_batch(model, batch=8, max_profile=5, lengths=[5, 0, 2, 3, 1, 4, 2, 5])

def forward_and_loss(*batch):
    return warp_loss(*model(*batch))

def whole_step(*batch):          # backward inside the traced function
    loss = warp_loss(*model(*batch))
    loss.backward()
    return loss.detach()

out = {}
for name, fn, config in (("forward_and_loss", forward_and_loss, {}),
                         ("whole_step", whole_step, {"trace_autograd_ops": True})):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**config):
        ex = torch._dynamo.explain(fn)(*batch)
    out[name] = dict(breaks=ex.graph_break_count, graphs=ex.graph_count,
                     reasons=[r.reason.splitlines()[0] for r in ex.break_reasons])
print(json.dumps(out))
"""


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles ACF.forward from scratch (compiled code is cached per code object),
    and without Inductor's on-disk caches: a graph cached by an earlier checkout of this
    project (another custom-op schema) was seen to be reused, calling the op with arguments
    it no longer has."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


def counting_backend():
    """(backend, counts): an AOT-autograd backend that runs the graphs as traced and counts
    the forward and backward graphs it is given."""
    counts = {"forward": 0, "backward": 0}

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            counts[kind] += 1
            return boxed_nop(gm, example_inputs)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward")), counts


def step(fwd, model, batch):
    model.zero_grad(set_to_none=True)
    loss = warp_loss(*fwd(*batch))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_traces_without_graph_breaks():
    script = f"SHAPE = {SHAPE!r}\n" + EXPLAIN
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, found in result.items():
        assert found["breaks"] == 0 and found["graphs"] == 1, (name, found)


def test_the_compiled_step_is_one_forward_and_one_backward_graph_with_eager_numbers():
    model = random_model(**SHAPE, backend="cpu")
    twin = same_model(model, "cpu")
    batch = random_batch(model, batch=8, max_profile=5, seed=1)
    backend, counts = counting_backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss_c, grads_c = step(compiled, model, batch)
    loss_e, grads_e = step(twin, twin, batch)
    assert counts == {"forward": 1, "backward": 1}
    torch.testing.assert_close(loss_c, loss_e)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_inductor_step_matches_eager_and_keeps_the_checks():
    """The default backend (Inductor) generates code for everything around the native ops;
    the id checks are assertions inside that code and still name the offending input."""
    model = random_model(**SHAPE, backend="cpu")
    twin = same_model(model, "cpu")
    batch = random_batch(model, batch=8, max_profile=5, seed=2)
    compiled = torch.compile(model)
    loss_c, grads_c = step(compiled, model, batch)
    loss_e, grads_e = step(twin, twin, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    bad_user = batch.user_ids.clone()
    bad_user[3] = SHAPE["n_users"]
    with pytest.raises(RuntimeError, match=r"user_ids contains an id outside the expected ids in \[0, 15\]"):
        compiled(bad_user, *batch[1:])
    bad_neg = batch.neg.clone()
    bad_neg[0] = 0   # the padding id is no item
    with pytest.raises(RuntimeError, match=r"neg contains an id outside the expected ids in \[1, 40\]"):
        compiled(*batch[:3], bad_neg, batch.profile_mask)
    with pytest.raises(RuntimeError, match="profile_mask disagrees with profile_ids"):
        compiled(*batch[:4], torch.ones_like(batch.profile_mask))


# (B, P) never seen before. A size of 1 is left out: torch.compile specialises sizes 0
# and 1, so a batch of one user, or with no profile longer than one item, compiles once
# more (docs/model.md#torchcompile).
SIZES = [(5, 3), (33, 9), (2, 2), (17, 6)]


def batch_of(model, b, p, seed):
    lengths = [(i * 7 + seed) % (p + 1) for i in range(b)]
    lengths[0] = p   # the profile width is the longest profile
    return random_batch(model, batch=b, lengths=lengths, seed=seed)


def test_new_batch_sizes_compile_once_more_then_never():
    """Default torch.compile: the first new (B, P) recompiles once with both sizes symbolic
    (automatic dynamic shapes); U, the distinct items, is symbolic from the start."""
    model = random_model(**SHAPE, backend="cpu")
    backend, counts = counting_backend()
    compiled = torch.compile(model, backend=backend)
    step(compiled, model, batch_of(model, 8, 5, seed=0))
    step(compiled, model, batch_of(model, 12, 4, seed=1))
    assert counts["forward"] == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, (b, p) in enumerate(SIZES):
            step(compiled, model, batch_of(model, b, p, seed=seed))
    assert counts["forward"] == 2


def test_dynamic_compiles_once_for_every_batch_size():
    model = random_model(**SHAPE, backend="cpu")
    backend, counts = counting_backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    step(compiled, model, batch_of(model, 8, 5, seed=0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, (b, p) in enumerate(SIZES):
            step(compiled, model, batch_of(model, b, p, seed=seed))
    assert counts["forward"] == 1


@pytest.mark.parametrize("rows", [
    [[3, 1, 3], [0, 0, 0], [7, 1, 0], [2, 0, 0]],   # duplicates and padding
    [[0, 0], [0, 0]],                                # no item at all: U = 0
    [[5]],
])
def test_the_exact_plan_is_a_custom_op_torch_compile_can_trace(rows):
    """The exact plan's size U depends on the ids: the op's fake gives it as a symbol."""
    from acf_fast.backends.planning import distinct_items

    ids = torch.tensor(rows)
    torch.library.opcheck(torch.ops.acf_fast.distinct_items.default, (ids, ids != 0))
    plan = distinct_items(ids, ids != 0)
    assert plan.item_ids.tolist() == sorted({i for row in rows for i in row} - {0})


def test_backward_traced_inside_the_compiled_function_gives_eager_gradients():
    """docs/model.md#torchcompile: with trace_autograd_ops, loss.backward() can sit inside
    the compiled function (the whole step, less the optimiser, one graph)."""
    model = random_model(**SHAPE, backend="cpu")
    twin = same_model(model, "cpu")
    batch = random_batch(model, batch=8, max_profile=5, seed=3)

    def whole_step(*b):
        loss = warp_loss(*model(*b))
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        loss_c = torch.compile(whole_step, backend="aot_eager", fullgraph=True)(*batch)
    loss_e, grads_e = step(twin, twin, batch)
    torch.testing.assert_close(loss_c, loss_e)
    for name, p in model.named_parameters():
        if name in grads_e:
            torch.testing.assert_close(p.grad, grads_e[name], rtol=1e-5, atol=1e-6)
        else:
            assert p.grad is None, name
