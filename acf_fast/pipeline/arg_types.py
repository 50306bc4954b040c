"""argparse types of the CLI: each refuses a bad value with the value and what is allowed."""

from __future__ import annotations

import argparse


def count(minimum: int = 1):
    """argparse type: an integer >= minimum, refused with the value and the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def number(*, positive: bool):
    """argparse type: a finite float, > 0 (positive) or >= 0, refused with the value."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value > 0 if positive else value >= 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(
                f"must be a {'positive finite number' if positive else 'finite number >= 0'}, "
                f"got {text}")
        return value
    parse.__name__ = "number"
    return parse


def formats(text: str) -> tuple[str, ...]:
    """argparse type: synth's feature formats ('h5', 'npy', 'h5,npy')."""
    from ..data.feature_files import parse_formats

    try:
        return parse_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


formats.__name__ = "formats"
