"""The ACF module, the tutorial's reference modules, weights, features, checkpoints, losses, scoring."""
