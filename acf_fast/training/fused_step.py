"""The whole training step (forward, loss, backward, Adam) in eleven Triton launches.

    kernels.train_step      3 launches forward + loss + backward: a program per profile
                                       slot (r, beta, xbar), per user (item attention,
                                       loss, dz), per slot (dxr, dr)
    kernels.outer_sum       6 launches dW_red, dW2x, dW2u, dW1u, dW1p, dW1x (split-K partials)
    kernels.embedding_grad  1 launch   the embedding tables' gradient rows summed per id
    kernels.adam            1 launch   sums the partials, reads the embedding rows, applies
                                       the loss scale (1/B, WARP's weight), updates every
                                       parameter

No ATen kernel runs inside the step, nothing is read back to the host, and every
shape is fixed by (B, P), so on a GPU the eleven launches are captured once in a CUDA
graph and each later step is one replay. Why this shape of pipeline and not autograd
plus torch.optim.Adam (acf_fast.training.cuda_graph): that step issues ~95 kernels,
and even replayed from a graph their gaps cost more than the arithmetic at B = 128.

Equal to the model's own step with torch.optim.Adam, to rounding: the same forward,
the same gradients (tests/training/test_fused_step.py compares them in float64), and
Adam's arithmetic including weight decay. The module's parameters become views of a
flat buffer and Adam's moments live in the optimizer's state (training.flat_params),
so checkpoints look the same either way. `.grad` is not filled.

Two ways to feed it:
- `step(user_ids, profile_ids, pos, neg)`: one batch from the host or the device
  (copied into the step's static buffers);
- `bind_epoch(triplets)` then `epoch_step()`: the training triplets stay on the device
  with the epoch's order, and a device cursor selects each step's batch, so a step is
  just a replay; the host reads the loss one step late (`loss` is a device scalar).
"""

from __future__ import annotations

import importlib
import sys

import torch

from ..backends import registry as _registry
from ..model.weights import ACFWeights
from .flat_params import FlatAdamState

_triton = None


def _kernels():
    """kernels.train_step, outer_sum, adam (through the triton backend, which maps the
    repository's kernels/ folder to acf_fast.kernels)."""
    global _triton
    if _triton is None:
        _triton = _registry.get("triton")   # imports acf_fast.kernels
    return tuple(importlib.import_module(f"acf_fast.kernels.{m}")
                 for m in ("train_step", "outer_sum", "adam", "_common", "reduce",
                           "embedding_grad"))


class _Plan:
    """Buffers and launch arguments for one batch shape (B users, P profile slots)."""

    def __init__(self, owner: "FusedTrainStep", B: int, P: int):
        ts, osum, adam, common, reduce, emb = _kernels()
        self.B, self.P = B, P
        st, w = owner.state, owner.weights
        M, F = owner.table.shape[1:]
        D = w.user_emb.shape[1]
        dev, dt = st.device, st.dtype
        rows = B * P * M
        self.D, self.M, self.F = D, M, F
        empty = lambda *shape, dtype=dt: torch.empty(shape, dtype=dtype, device=dev)  # noqa: E731
        # the embedding tables' (id, gradient row) lists, one buffer for all three so that
        # each table's entries are one range (kernels.embedding_grad): a user's gradient
        # comes in 1 + P pieces, rows [0, B) from the user step and B + slot from each
        # slot (through the component attention's uu); then pos and neg; then the profiles
        n_user, n_item = B + B * P, 2 * B
        self.ids, self.grad_rows = empty(n_user + n_item + B * P, dtype=torch.int64), \
            empty(n_user + n_item + B * P, D)
        self.user_ids, self.item_ids, self.prof_ids = self.ids.split([n_user, n_item, B * P])
        self.duser, self.ditem, self.dprof = self.grad_rows.split([n_user, n_item, B * P])
        self.r, self.dr, self.dxr = empty(rows, D), empty(rows, D), empty(rows, D)
        self.xbar, self.dz = empty(B * P, D), empty(B * P, D)
        self.terms, self.flags, self.scores = empty(B), empty(B), empty(B, 2)
        self.vec_width = 2 * D + 1   # [w1 | b1 | c1] per user, [w2 | b_red | c2] per slot
        # the dense partial gradients, one flat buffer: [vec | svec | dut | duu | outer sums]
        cuda = dev.type == "cuda" and not common.interpreting()
        cap = reduce._capability(dev) if cuda else 90
        sms = reduce._sm_count(dev) if cuda else 132
        low = reduce.use_tensor_cores(owner.table.dtype, dt, dev)
        prec = common.dot_precision(dt, dev)
        O = osum.OuterSum
        user_rows = dict(x=w.user_emb, group=1, stride_id=D, stride_sub=0, NB=D)
        # placeholders for A (dut, duu): the partial buffer is allocated below
        self.sums = {
            "red_w": O(self.dr, owner.table, self.prof_ids, M, owner.table.stride(0),
                       owner.table.stride(1), F, sms, cap, low, prec),
            "c_wx": O(self.dxr, self.r, None, 1, D, 0, D, sms, cap, False, prec),
            "i_wp": O(self.dz, w.profile_emb, self.prof_ids, 1, D, 0, D, sms, cap, False, prec),
            "i_wx": O(self.dz, self.xbar, None, 1, D, 0, D, sms, cap, False, prec),
        }
        sizes = {"vec": B * self.vec_width, "svec": B * P * self.vec_width, "dut": B * D,
                 "duu": B * P * D}
        for name, s in self.sums.items():
            sizes[name] = s.splits * s.NA * s.NB
        for name, n in (("i_wu", B), ("c_wu", B * P)):   # A = dut / duu (views into the buffer below)
            sizes[name] = osum.split_plan(n, D, D, osum.blocks(D, D, False, cap), sms)[0] * D * D
        self.part_offset, total = {}, 0
        for name, n in sizes.items():
            self.part_offset[name] = total
            total += -(-n // 64) * 64
        self.partials = torch.zeros(total, dtype=dt, device=dev)
        part = lambda name, shape: self.partials[self.part_offset[name]:self.part_offset[name] + sizes[name]].view(shape)  # noqa: E731
        self.vec = part("vec", (B, self.vec_width))
        self.svec = part("svec", (B * P, self.vec_width))
        self.dut = part("dut", (B, D))
        self.duu = part("duu", (B * P, D))
        self.sums["i_wu"] = O(self.dut, ids=self.user_ids[:B], **user_rows, sm_count=sms,
                              cap=cap, precision=prec)
        self.sums["c_wu"] = O(self.duu, ids=self.user_ids[B:], **user_rows, sm_count=sms,
                              cap=cap, precision=prec)
        for name, s in self.sums.items():
            s.out = part(name, s.partial_shape)
        self.adam_blocks = adam.blocks(cap)
        self.seg_table, self.n_blocks = self._segments(owner, adam, B, D)
        self.row_blocks = emb.blocks(D, cap)
        self.row_spec, self.n_row_blocks = self._row_tables(owner, emb, n_user, n_item, B * P)
        self.step_kernel, self.adam, self.row_sums = ts, adam, emb
        self.low, self.prec = low, prec
        self.ts_blocks = ts.blocks(P, M, D, low, cap)

    def _row_tables(self, owner, emb, n_user: int, n_item: int, n_prof: int):
        """kernels.embedding_grad's table spec (TABLE_FIELDS): each embedding table's range
        of the id / row lists, and where its rows go in the owner's dense buffer."""
        E = self.row_blocks["BLOCK_E"]
        # name -> (start, count, skip_zero); gradients() sums the same ranges with torch
        self.row_ranges = ranges = {
            "user_emb": (0, n_user, 0),                        # users: no padding row
            "item_emb": (n_user, n_item + (n_prof if owner.tied else 0), 1)}
        if not owner.tied:
            ranges["profile_emb"] = (n_user + n_item, n_prof, 1)
        rows, first = [], 0
        for name, (start, count, skip_zero) in ranges.items():
            rows.append([first, start, count, owner.emb_offsets[name], skip_zero])
            first += -(-count // E)
        return torch.tensor(rows, dtype=torch.int64, device=owner.state.device), first

    def _segments(self, owner, adam, B, D):
        """The optimizer kernel's segment table (kernels.adam.SEG_FIELDS), one row a parameter."""
        st = owner.state
        vec, svec, dut, duu = (self.part_offset[k] for k in ("vec", "svec", "dut", "duu"))
        W, S = self.vec_width, B * self.P
        dense = {   # name -> (part_offset, part_stride, n_parts)
            "red_b": (svec + D, W, S), "c_bx": (duu, D, S), "c_bu": (duu, D, S),
            "c_w": (svec, W, S), "c_b": (svec + 2 * D, W, S),
            "i_bu": (dut, D, B), "i_bp": (vec + D, W, B), "i_bx": (vec + D, W, B),
            "i_w": (vec, W, B), "i_b": (vec + 2 * D, W, B),
        }
        for name, s in self.sums.items():
            dense[name] = (self.part_offset[name], s.NA * s.NB, s.splits)
        rows, first = [], 0
        for name in st.names:
            numel = st.params[name].numel()
            off, stride, n = dense.get(name, (0, 0, 0))
            rows.append([first, numel, st.offsets[name], off, stride, n,
                         owner.emb_offsets.get(name, -1)])
            first += -(-numel // self.adam_blocks["BLOCK"])
        table = torch.tensor(rows, dtype=torch.int64, device=st.device)
        return table, first


class FusedTrainStep:
    def __init__(self, model, optimizer, loss: str = "warp", *, capture: bool | None = None):
        ts = _kernels()[0]
        if loss not in ts.LOSS_CODES:
            raise ValueError(f"the fused step implements the losses {sorted(ts.LOSS_CODES)}, not {loss!r}")
        if model.resolved_backend() != "triton":
            raise ValueError(f"the fused step runs the triton backend; this model runs "
                             f"{model.resolved_backend()!r}")
        self.weights = ACFWeights.of(model)
        D = self.weights.user_emb.shape[1]
        if self.weights.c_wx.shape[0] != D:
            raise ValueError("the fused step needs the attention hidden size H == model_dim")
        self.table = model.feature_table
        device = self.weights.user_emb.device
        if self.table.device != device:
            raise ValueError(f"the fused step needs the feature table on {device} with the "
                             f"parameters, not on {self.table.device} (features_on_host=False)")
        capture = device.type == "cuda" if capture is None else bool(capture)
        if capture and device.type != "cuda":
            raise ValueError(f"capture=True needs the model on a CUDA device, not {device}")
        self.model, self.optimizer, self.loss_name = model, optimizer, loss
        self.loss_code = ts.LOSS_CODES[loss]
        self.tied = self.weights.profile_emb is self.weights.item_emb
        self.capture = capture
        self.reset()

    def reset(self) -> None:
        """(Re)adopt the optimizer's state (after `optimizer.load_state_dict`) and drop plans."""
        self.state = FlatAdamState(self.model, self.optimizer)
        self.weights = ACFWeights.of(self.model)
        # the embedding tables' summed gradient rows (kernels.embedding_grad), zero between
        # steps: the optimizer kernel clears what it reads
        self.emb_offsets, total = {}, 0
        for name in ("user_emb", "item_emb", "profile_emb"):
            if name in self.state.names:
                self.emb_offsets[name] = total
                total += self.state.params[name].numel()
        self.emb_grad = torch.zeros(total, dtype=self.state.dtype, device=self.state.device)
        self._plans, self._inputs, self._graphs = {}, {}, {}
        self.loss = torch.zeros(1, dtype=self.state.dtype, device=self.state.device)
        self._source = None
        self.replays = 0

    # ------------------------------------------------------------------ feeding
    def step(self, user_ids, profile_ids, pos, neg) -> torch.Tensor:
        """One step on one batch; returns the loss as a device scalar. A host batch is
        checked on the host and never waits for the GPU; one already on the GPU costs a
        read-back for its id check (the trainer feeds epochs instead: bind_epoch)."""
        src, B, P = self._load(user_ids, profile_ids, pos, neg)
        self._run(("batch", B, P), B, P, src, advance=False)
        return self.loss[0]

    def _load(self, user_ids, profile_ids, pos, neg):
        """Copy a batch into the input buffers of its shape (made once): (buffers, B, P).
        Its ids are checked where they are (a host batch on the host, so the GPU never
        waits): an id outside its table would make the kernels read and write out of
        bounds, and the padding id 0 is no positive or negative item."""
        user_ids, profile_ids, _, pos, neg = self.model._check_batch(
            user_ids, profile_ids, None, pos, neg, device=getattr(user_ids, "device", None))
        B, P = profile_ids.shape[0], max(profile_ids.shape[1], 1)
        if (B, P) not in self._inputs:
            dev = self.state.device
            ids = lambda *s: torch.zeros(s, dtype=torch.int64, device=dev)  # noqa: E731
            self._inputs[(B, P)] = dict(users=ids(B), pos=ids(B), neg=ids(B), profiles=ids(B, P),
                                        order=torch.arange(B, device=dev), cursor=ids(1))
        src = self._inputs[(B, P)]
        for name, value in (("users", user_ids), ("pos", pos), ("neg", neg)):
            src[name].copy_(value)
        src["profiles"].zero_()
        src["profiles"][:, :profile_ids.shape[1]].copy_(profile_ids)
        return src, B, P

    def _plan(self, B: int, P: int) -> _Plan:
        if (B, P) not in self._plans:
            self._plans[(B, P)] = _Plan(self, B, P)
        return self._plans[(B, P)]

    def bind_epoch(self, users, profiles, pos, neg, order, batch_size: int | None = None,
                   start: int = 0) -> None:
        """The training triplets (device tensors) and an epoch's order: step k trains on
        order[k * batch_size:][:B]; the cursor starts at step `start` (a resume)."""
        dev = self.state.device
        stride = int(batch_size or order.numel())
        if self._source is None or self._source["given"] is not profiles:
            # new triplets: their ids checked once (one read-back), as _load checks a
            # batch; the graphs captured on the old ones would read stale buffers
            given = profiles
            users, profiles, _, pos, neg = self.model._check_batch(users, profiles, None, pos,
                                                                   neg, device=dev)
            cursor = torch.zeros(1, dtype=torch.int64, device=dev)
            self._source = dict(users=users, pos=pos, neg=neg, profiles=profiles, cursor=cursor,
                                order=torch.empty(order.numel(), dtype=torch.int64, device=dev),
                                given=given)
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != "epoch"}
        src = self._source
        self.model._check_ranges([("order", order, 0, src["users"].shape[0])])
        if src["order"].numel() != order.numel():
            src["order"] = torch.empty(order.numel(), dtype=torch.int64, device=dev)
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != "epoch"}
        # copied into the same buffers: a captured graph keeps reading them
        src["order"].copy_(order)
        src["cursor"].fill_(start)
        src["stride"] = stride

    def epoch_step(self, batch_size: int) -> torch.Tensor:
        """The next `batch_size` triplets of the bound epoch order (a full batch replays the
        captured graph; the cursor advances on the device)."""
        src = self._source
        P = src["profiles"].shape[1]
        self._run(("epoch", batch_size, P), batch_size, P, src, advance=True)
        return self.loss[0]

    # ------------------------------------------------------------------ launching
    def _run(self, key, B, P, src, advance: bool) -> None:
        plan = self._plan(B, P)
        if not self.capture:
            self.launch(plan, src, advance)
            return
        graph = self._graphs.get(key)
        if graph is None:
            self.launch(plan, src, advance)   # compiles every kernel outside the capture
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.launch(plan, src, advance)
            except RuntimeError as exc:
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                print(f"acf_fast: CUDA-graph capture failed ({type(exc).__name__}: {first}); "
                      "training continues without the graph", file=sys.stderr)
                self.capture = False
                return
            self._graphs[key] = graph
            return   # the warm-up launch above was this step
        graph.replay()
        self.replays += 1

    def launch(self, plan: _Plan, src: dict, advance: bool, update: bool = True) -> None:
        """The eleven launches of one step (what a graph captures); update=False stops
        before the embedding-row sums and the optimizer (the gradients stay in the plan's
        buffers, and emb_grad stays zero)."""
        w, st, ts = self.weights, self.state, plan.step_kernel
        B, P, D = plan.B, plan.P, plan.D
        t = self.table
        batch = (src["order"], src["cursor"], src.get("stride", B), src["users"])
        profiles = (src["profiles"], src["profiles"].stride(0))
        bl, prec = plan.ts_blocks, plan.prec
        ts._slot_forward_kernel[(B * P,)](
            *batch, *profiles, t, t.stride(0), t.stride(1), w.user_emb, w.red_w, w.red_b,
            w.c_wx, w.c_bx, w.c_wu, w.c_bu, w.c_w, w.c_b, plan.r, plan.xbar,
            P, plan.M, plan.F, D, PRECISION=prec, LOW=plan.low, **bl["slot_forward"])
        ts._user_step_kernel[(B,)](
            *batch, src["pos"], src["neg"], *profiles, w.item_emb, w.profile_emb, w.user_emb,
            w.i_wu, w.i_bu, w.i_wp, w.i_bp, w.i_wx, w.i_bx, w.i_w, w.i_b, plan.xbar,
            plan.user_ids, plan.item_ids, plan.prof_ids, plan.duser, plan.ditem, plan.dprof,
            plan.dz, plan.dut, plan.vec, plan.terms, plan.flags, plan.scores,
            st.step if update else None,   # a gradient-only launch is no Adam step
            B, P, D, plan.vec_width, LOSS=self.loss_code, PRECISION=prec, **bl["user"])
        ts._slot_backward_kernel[(B * P,)](
            *batch, *profiles, w.user_emb, w.c_wx, w.c_bx, w.c_wu, w.c_bu, w.c_w, w.c_b, w.i_wx,
            plan.r, plan.dz, plan.dr, plan.dxr, plan.duu, plan.svec, plan.user_ids, plan.duser,
            B, P, plan.M, D, plan.vec_width, PRECISION=prec, **bl["slot_backward"])
        for s in plan.sums.values():
            s.launch()
        self._last = plan
        if not update:
            return
        self.sum_embedding_rows(plan)
        adam = plan.adam
        adam._adam_kernel[(plan.n_blocks,)](
            st.flat, st.exp_avg, st.exp_avg_sq, plan.partials, plan.seg_table,
            plan.seg_table.shape[0], self.emb_grad,
            plan.terms, plan.flags, B, self.loss, st.step, src["cursor"] if advance else None,
            st.hyper, WARP=self.loss_code == 0, N_FIELDS=len(adam.SEG_FIELDS), **plan.adam_blocks)

    def sum_embedding_rows(self, plan: _Plan) -> None:
        """The embedding tables' gradient rows summed per id into `emb_grad` (one launch;
        the optimizer kernel reads and clears it)."""
        emb = plan.row_sums
        emb._row_sums_kernel[(plan.n_row_blocks,)](
            plan.ids, plan.grad_rows, plan.row_spec, plan.row_spec.shape[0], self.emb_grad,
            plan.D, N_FIELDS=len(emb.TABLE_FIELDS), **plan.row_blocks)

    # ------------------------------------------------------------------ inspection
    def weights_unique(self) -> list[torch.Tensor]:
        """The trained parameters, each once (a tied profile embedding is the item one)."""
        return [self.state.params[name] for name in self.state.names]

    def loss_and_gradients(self, user_ids, profile_ids, pos, neg):
        """(loss, gradients in weights_unique() order) of one batch, parameters untouched:
        the step's kernels without the optimizer, the sums done with torch (for tests)."""
        src, B, P = self._load(user_ids, profile_ids, pos, neg)
        self.launch(self._plan(B, P), src, advance=False, update=False)
        grads = self.gradients()
        scale = self._scale(self._last)
        return scale * self._last.terms.sum(), [grads[name] for name in self.state.names]

    def _scale(self, plan) -> torch.Tensor:
        scale = torch.ones((), dtype=self.state.dtype, device=self.state.device) / plan.B
        if self.loss_code == 0:
            scale = scale * (torch.log(plan.flags.sum() + 1) + 1)
        return scale

    def gradients(self) -> dict:
        """The last step's gradient of every ACFWeights field (tied fields share one),
        assembled with torch from the step's buffers: what the optimizer kernel summed."""
        plan, st = self._last, self.state
        out = {}
        for name, row in zip(st.names, plan.seg_table.tolist()):   # one row a name, in order
            _, numel, _, part_off, stride, n, _ = row
            g = torch.zeros(numel, dtype=st.dtype, device=st.device)
            for k in range(n):
                g += plan.partials[part_off + k * stride:part_off + k * stride + numel]
            if name in plan.row_ranges:      # an embedding table: its (id, row) entries
                start, count, skip_zero = plan.row_ranges[name]
                g = g.view(-1, plan.D).index_add_(0, plan.ids[start:start + count],
                                                  plan.grad_rows[start:start + count])
                if skip_zero:
                    g[0] = 0        # the padding row
            out[name] = (g.reshape(st.params[name].shape) * self._scale(plan))
        if self.tied:
            out["profile_emb"] = out["item_emb"]
        return out
