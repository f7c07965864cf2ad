"""`ImplStatus`, the answer of every "can this impl run here?" probe.

A leaf module: `_backends` (which impls can run where) imports `_ext` (the native extension's own
probe), and both return this type; keeping it here lets `_ext` import nothing of `_backends`
(docs/design.md "Layers and imports").
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["ImplStatus"]


class ImplStatus(NamedTuple):
    available: bool
    reason: str
