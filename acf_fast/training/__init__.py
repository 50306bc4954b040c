"""Training: config, the epoch walk, steps, CUDA graph, run folder, validation, the loop."""
