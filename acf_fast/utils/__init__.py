"""Leaf helpers every layer may use: environment, devices, determinism, progress."""
