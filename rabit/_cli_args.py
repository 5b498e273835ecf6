"""argparse types, options and the error class shared by every rabit command (rabit.cli, rabit.cli_export)."""

from __future__ import annotations

import argparse


class CommandError(Exception):
    """A failure the user can fix; ``rabit.cli.main`` prints it as ``rabit: error: <message>``, exit status 1."""


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def token_count(text: str) -> int:
    """A count of tokens, written as an integer or a float (2.5e6): finite, >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens (such as 2.5e6), got {text!r}") from None
    if not (value >= 0 and value != float("inf")):  # also NaN
        raise argparse.ArgumentTypeError(f"expected a finite number of tokens >= 0, got {text!r}")
    return int(value)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout (the human-readable report is not printed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage messages on stderr")
