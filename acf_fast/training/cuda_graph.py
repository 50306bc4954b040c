"""Training steps captured in a CUDA graph: one replay per step instead of ~100 launches.

Why: with the triton backend a B = 128 step is well under a millisecond of GPU work,
but the host needs several milliseconds to issue its kernels, matmuls and custom-op
calls (gpu_bench's "host ms" column), so the GPU idles most of the step. A CUDA graph
records the launches once and replays them all with a single call.

What makes the step capturable (`static_pair_scores` of acf_fast.backends.triton):
nothing is read back to the host and every shape is fixed by (B, P):
- the batch's distinct items are padded to min(B * P, N), their live count kept in
  device memory (acf_fast.kernels.fused_acf.distinct_items);
- the ids are range-checked here on the tensors the caller passes, before they are
  copied into the graph's input buffers: pass host (CPU) tensors and the GPU never
  waits for a check;
- profiles are padded to `model.max_profile_size` columns (padding is masked out, so
  the result is the same);
- the optimizer keeps its step counts on the device: Adam/AdamW with capturable=True.

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
    step = GraphedTrainStep(model, opt, warp_loss)
    for user_ids, profile_ids, pos, neg in batches:        # CPU tensors
        loss = step(user_ids, profile_ids, pos, neg)       # 0-dim tensor on the GPU

Every call is exactly one training step on its own batch, graphed or not: the first
`warmup` calls of the graph's batch size (the largest seen before the capture) run
eagerly, on a side stream as capture requires (lazy cuBLAS and Triton initialisation
happen there); the next one captures the step and replays it, and later calls of that
size replay. A smaller batch (an epoch's last, partial one) or a wider profile runs
eagerly on the same static path; a capture that fails prints one line and leaves
every step eager.

What a replay cannot see (it re-runs what was recorded): new optimizer
hyper-parameters (a learning-rate schedule needs a tensor lr), replaced parameter or
optimizer-state tensors (after `optimizer.load_state_dict`, call `reset()`). The
returned loss is overwritten by the next replay: read it before the next call.
`capture=False` runs every step eagerly on the static path (any device; the tests
use it on the CPU).
"""

from __future__ import annotations

import sys

import torch

from ..backends import registry as _backend


class GraphedTrainStep:
    def __init__(self, model, optimizer: torch.optim.Optimizer, loss_fn, *, warmup: int = 3,
                 capture: bool | None = None):
        device = model.item_model.weight.device
        name = model.resolved_backend()
        impl = _backend.get(name)
        if not hasattr(impl, "static_pair_scores"):
            raise ValueError(f"a CUDA-graph step needs the triton backend; this model runs "
                             f"the {name!r} backend")
        if model.feature_table.device != device:
            raise ValueError(f"a CUDA-graph step needs the feature table on {device} with the "
                             f"parameters, not on {model.feature_table.device} "
                             "(features_on_host=False)")
        capture = device.type == "cuda" if capture is None else bool(capture)
        if capture and device.type != "cuda":
            raise ValueError(f"capture=True needs the model on a CUDA device, not {device} "
                             "(capture=False runs the same static step eagerly)")
        if capture:
            plain = [i for i, g in enumerate(optimizer.param_groups) if not g.get("capturable")]
            if plain:
                raise ValueError(f"the optimizer's param group(s) {plain} are not capturable: "
                                 "create it with capturable=True (e.g. torch.optim.Adam(..., "
                                 "fused=True, capturable=True))")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.capture, self.warmup = capture, warmup
        self.device = device
        self.width = model.max_profile_size
        self._impl = impl
        self.reset()

    def reset(self) -> None:
        """Drop the captured graph (the next full-size batch warms up and captures again)."""
        self._graph = None
        self._loss = None
        self._inputs = None      # (user_ids, profile_ids, pos, neg, profile_mask) on the device
        self._staging = None     # the same in pinned host memory, and the event of their copy
        self._copied = None
        self._warm = 0
        self.replays = 0         # steps run by replaying the graph (for tests and logs)

    # ------------------------------------------------------------------ one step
    def __call__(self, user_ids, profile_ids, pos, neg, profile_mask=None) -> torch.Tensor:
        where = profile_ids.device if isinstance(profile_ids, torch.Tensor) else None
        user_ids, profile_ids, profile_mask, pos, neg = self.model._check_batch(
            user_ids, profile_ids, profile_mask, pos, neg, device=where)
        B, P = profile_ids.shape
        if P > self.width:
            return self._run(*self._on_device(user_ids, profile_ids, pos, neg, profile_mask))
        if P < self.width:  # pad to the captured width: masked slots change nothing
            profile_ids = torch.nn.functional.pad(profile_ids, (0, self.width - P))
            profile_mask = torch.nn.functional.pad(profile_mask, (0, self.width - P))
        batch = (user_ids, profile_ids, pos, neg, profile_mask)
        if not self.capture:
            return self._run(*self._on_device(*batch))
        if self._inputs is None or (self._graph is None and self._inputs[0].shape[0] < B):
            # the graph's batch size is the largest seen before the capture: a partial
            # batch arriving first (a resume at an epoch's end) gives way to the next full
            # one, and smaller batches never restart the warm-up (they run eagerly)
            self._allocate(batch)
        if self._inputs[0].shape[0] != B:
            return self._run(*self._on_device(*batch))
        self._load(batch)
        if self._warm < self.warmup:
            self._warm += 1
            return self._on_side_stream(lambda: self._run(*self._inputs))
        if self._graph is None and not self._capture():
            return self._run(*self._inputs)
        self._graph.replay()
        self.replays += 1
        return self._loss

    def _allocate(self, batch) -> None:
        self._graph, self._loss, self._warm = None, None, 0
        self._inputs = tuple(torch.empty(t.shape, dtype=t.dtype, device=self.device)
                             for t in batch)
        self._staging = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                              for t in batch)
        self._copied = None

    def _load(self, batch) -> None:
        """Copy a batch into the graph's inputs. Host tensors go through pinned buffers:
        a copy from pageable memory would make the host wait for the GPU to finish the
        previous step, and the host could no longer prepare the next step meanwhile."""
        if batch[0].device.type != "cpu":
            for buf, t in zip(self._inputs, batch):
                buf.copy_(t)
            return
        if self._copied is not None:
            self._copied.synchronize()   # the previous copy out of the staging buffers
        for stage, t in zip(self._staging, batch):
            stage.copy_(t)
        for buf, stage in zip(self._inputs, self._staging):
            buf.copy_(stage, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def _on_device(self, *tensors):
        return tuple(t.to(self.device, non_blocking=True) for t in tensors)

    def _run(self, user_ids, profile_ids, pos, neg, profile_mask) -> torch.Tensor:
        # once a graph exists its gradient buffers stay the parameters' .grad: an eager
        # step accumulates into them (zeroed) instead of replacing them, so .grad keeps
        # showing the latest step whichever way it ran
        self.optimizer.zero_grad(set_to_none=self._graph is None)
        loss = self._forward_backward(user_ids, profile_ids, pos, neg, profile_mask)
        self.optimizer.step()
        return loss

    def _forward_backward(self, user_ids, profile_ids, pos, neg, profile_mask):
        spos, sneg = self._impl.static_pair_scores(self.model, user_ids, profile_ids, pos, neg,
                                                   profile_mask)
        loss = self.loss_fn(spos, sneg)
        loss.backward()
        return loss

    def _on_side_stream(self, fn):
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = fn()
        current.wait_stream(side)
        out.record_stream(current)   # made on the side stream, used on this one
        return out

    def _capture(self) -> bool:
        """Capture the step; False (after a one-line notice) when capture fails, and the
        step then runs eagerly from now on."""
        # gradients start as None so that backward allocates them inside the graph's
        # memory pool: each replay then writes them in place, and the captured
        # optimizer step reads them from there
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.graph(graph):
                loss = self._forward_backward(*self._inputs)
                self.optimizer.step()
        except RuntimeError as exc:
            # torch.cuda.graph does not restore the caller's stream when ending an
            # invalidated capture raises: without this every later step would run on
            # the capture's side stream
            torch.cuda.set_stream(stream)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            print(f"acf_fast: CUDA-graph capture failed ({type(exc).__name__}: {first}); "
                  "training continues without the graph", file=sys.stderr)
            self.capture = False
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self._graph, self._loss = graph, loss
        return True
