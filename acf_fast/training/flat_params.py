"""The model's parameters and Adam's moments as flat buffers, for the one-launch optimizer.

`FlatAdamState(model, optimizer)` moves every parameter into one flat buffer (the
module's parameters become views of it, so the model, its state_dict and its
checkpoints see nothing new) and Adam's exp_avg / exp_avg_sq into two more, which it
hands back to the torch optimizer as its state: `optimizer.state_dict()` then saves
exactly what the fused step trains with, and a checkpoint written during a fused run
resumes under plain torch.optim.Adam and the other way round. The step count is one
device scalar, shared by every parameter's state (they are always equal).

Each parameter starts at a multiple of ALIGN elements so that vector loads stay
aligned. Tied parameters (profile embedding = item embedding) appear once.
"""

from __future__ import annotations

import torch

from ..model.weights import ACFWeights

ALIGN = 64


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def check_adam(optimizer) -> dict:
    """The hyper-parameters of a plain torch.optim.Adam with one param group; anything the
    fused kernel does not implement is refused with the reason."""
    if type(optimizer) is not torch.optim.Adam:
        raise ValueError(f"the fused step implements torch.optim.Adam, got {type(optimizer).__name__}")
    if len(optimizer.param_groups) != 1:
        raise ValueError("the fused step needs one param group (it applies one lr to all)")
    group = optimizer.param_groups[0]
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(f"the fused step does not implement Adam's {flag}=True")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    beta1, beta2 = (float(b) for b in group["betas"])
    return dict(lr=float(lr), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]))


class FlatAdamState:
    def __init__(self, model, optimizer):
        self.hyper_values = check_adam(optimizer)
        weights = ACFWeights.of(model)
        unique, seen = [], set()
        for name, p in zip(ACFWeights._fields, weights):
            if id(p) not in seen:
                seen.add(id(p))
                unique.append((name, p))
        # the tutorial's user_model.w_v is never used by the forward: torch's Adam skips it
        # (its .grad stays None), and so does the fused step
        optimized = {id(p) for p in optimizer.param_groups[0]["params"]}
        if not seen <= optimized <= {id(p) for p in model.parameters()}:
            raise ValueError("the fused step needs an optimizer over the model's parameters")
        dtypes = {p.dtype for _, p in unique}
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
            raise ValueError(f"the fused step needs float32 or float64 parameters, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.device = weights.user_emb.device
        self.names = [name for name, _ in unique]
        self.offsets, total = {}, 0
        for name, p in unique:
            self.offsets[name] = total
            total = _round_up(total + p.numel(), ALIGN)
        self.total = total
        self.params = {name: p for name, p in unique}
        self.step = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.hyper = torch.tensor([self.hyper_values[k] for k in
                                   ("lr", "beta1", "beta2", "eps", "weight_decay")],
                                  dtype=self.dtype, device=self.device)
        self.flat = torch.zeros(total, dtype=self.dtype, device=self.device)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self._adopt(optimizer)

    def view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        p = self.params[name]
        start = self.offsets[name]
        return buffer[start:start + p.numel()].view(p.shape)

    def _adopt(self, optimizer) -> None:
        """Copy values and Adam state in, then make the parameters and the state views."""
        steps = set()
        for name, p in self.params.items():
            state = optimizer.state.get(p, {})
            with torch.no_grad():
                self.view(self.flat, name).copy_(p)
                if "exp_avg" in state:
                    self.view(self.exp_avg, name).copy_(state["exp_avg"])
                    self.view(self.exp_avg_sq, name).copy_(state["exp_avg_sq"])
            if "step" in state:
                steps.add(float(state["step"]))
        if len(steps) > 1:
            raise ValueError(f"the optimizer's parameters are at different steps {sorted(steps)}; "
                             "the fused step keeps one step count")
        self.step.fill_(steps.pop() if steps else 0.0)
        shared_step = self.step.view(())
        for name, p in self.params.items():
            p.data = self.view(self.flat, name)
            p.grad = None
            optimizer.state[p] = {"step": shared_step, "exp_avg": self.view(self.exp_avg, name),
                                  "exp_avg_sq": self.view(self.exp_avg_sq, name)}
