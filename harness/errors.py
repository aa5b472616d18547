"""The one error type the CLI turns into a clear message (no traceback) and a non-zero exit."""

from __future__ import annotations

from collections.abc import Iterable


class HarnessError(Exception):
    pass


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> HarnessError:
    return HarnessError(f"unknown {kind} '{name}'; valid {kind}s: {', '.join(sorted(valid))}")
