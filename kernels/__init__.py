"""Triton kernels for ACF (installed as acf_fast.kernels).

Each module reads kernel(s) -> host launcher:
- `reduce`:              gather-GEMM r = W_red x + b_red per distinct item, and dW_red
- `component_attention`: attention over the 49 grid cells per (user, slot), fwd + bwd
- `item_attention`:      attention over the profile slots, user vector, scores, fwd + bwd
- `fused_acf`:           the whole forward / backward composed from the above
The autograd / torch.library wiring lives in `acf_fast.backends.triton`.

The fused training step (acf_fast.training.fused_step) launches its own:
- `train_step`:          forward, loss and backward per profile slot, per user, per slot
- `outer_sum`:           split-K weight gradients (also the autograd backend's dW_red)
- `embedding_grad`:      the embedding tables' gradient rows summed per id
- `adam`:                torch.optim.Adam over every parameter in one launch
"""
