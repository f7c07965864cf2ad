"""Code that differs between the two stacks CI runs (README "Development": torch 2.14 + triton 3.8 in the
README's leg, the GPU machine's torch 2.11 + triton 3.6 in the second) chooses by feature detection, never
by version string. Each detection is tested on both sides here, whichever stack runs the test: the side
this stack takes for real, the other by taking the feature away (or putting a stand-in in)."""
from __future__ import annotations

import os
import types

import pytest

triton = pytest.importorskip("triton")
from fused_optim.kernels import multi_tensor as mt  # noqa: E402


class _Runtime:
    """A stand-in for `triton.knobs.runtime`, which caches TRITON_INTERPRET once read."""


def test_interpret_scope_with_triton_knobs(monkeypatch):
    """With `triton.knobs` (triton >= 3.4: both stacks today) the cached interpret knob is dropped inside the
    scope, so `triton.jit` reads the variable set there, and restored after it."""
    runtime = _Runtime()
    runtime.__dict__["interpret"] = "cached"
    monkeypatch.setattr(triton, "knobs", types.SimpleNamespace(runtime=runtime), raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with mt._interpret_scope(True):
        assert os.environ["TRITON_INTERPRET"] == "1" and "interpret" not in runtime.__dict__
    assert os.environ["TRITON_INTERPRET"] == "0" and runtime.__dict__["interpret"] == "cached"


def test_interpret_scope_without_triton_knobs(monkeypatch):
    """A triton without `knobs` reads the variable directly: the scope sets and restores only that."""
    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with mt._interpret_scope(True):
        assert os.environ["TRITON_INTERPRET"] == "1"
    assert "TRITON_INTERPRET" not in os.environ


def test_fast_interpreted_device_functions_when_the_interpreter_has_rewrite():
    from triton.runtime import interpreter

    if not hasattr(interpreter.InterpretedFunction, "rewrite"):
        pytest.skip("this triton's interpreter has no rewrite(): the other side's test covers it")
    deco = mt._fast_interpreted_device_fn()
    assert deco is not triton.jit and issubclass(deco, interpreter.InterpretedFunction)


def test_fast_interpreted_device_functions_fall_back_to_triton_jit(monkeypatch):
    """An interpreter without the hook: plain `triton.jit` (correct, only slower on the CPU)."""
    from triton.runtime import interpreter

    class Bare:  # no rewrite()
        pass
    monkeypatch.setattr(interpreter, "InterpretedFunction", Bare)
    assert mt._fast_interpreted_device_fn() is triton.jit
