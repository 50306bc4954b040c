"""Python side of the native ops: autograd and fake (meta) registrations.

The C++ library defines each op once (TORCH_LIBRARY in csrc/); here each gets a
`register_fake` so torch.compile can trace it and a `register_autograd` formula.
"""

from __future__ import annotations

import torch

from . import cpu_extension as _ext

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _ext.load()

    @torch.library.register_fake("acf_fast::masked_softmax")
    def _(logits, mask):
        return torch.empty_like(logits)

    @torch.library.register_fake("acf_fast::masked_softmax_backward")
    def _(grad, out):
        return torch.empty_like(out)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.acf_fast.masked_softmax_backward(grad.contiguous(), out), None

    torch.library.register_autograd("acf_fast::masked_softmax", backward, setup_context=setup_context)
    _REGISTERED = True


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `mask`; a row with no valid entry is all zeros."""
    _register()
    return torch.ops.acf_fast.masked_softmax(logits, mask.bool())
