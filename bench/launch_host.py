"""Host cost of the Triton launchers with the kernel stubbed out: per-thread CPU time per call.

    PYTHONPATH=<tree> python bench/launch_host.py [lion|lion_lr_tensor|adan|gravity ...]
    LAUNCH_ONLY=1 ...   # prepare_launches memoized: only the launch itself (tables, arguments, kernel call)

The interpreter's `run` is replaced by a no-op, so what is timed is the Python the launcher runs per
step on the host. Runs against any checkout (it uses only the launchers' signatures), so two trees
can be compared in alternating processes (bench/NOTES.md, "Host cost of a Triton launch").
"""
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
from triton.runtime.interpreter import InterpretedFunction

InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None
from fused_optim.kernels import adan, gravity, lion
from fused_optim.kernels import multi_tensor as mt

if os.environ.get("LAUNCH_ONLY"):
    _real, _memo = mt.prepare_launches, {}

    def _prep(params, grads, states, **kw):
        key = (id(params), tuple(map(id, states)), tuple(kw.items()))
        if key not in _memo:
            _memo[key] = _real(params, grads, states, **kw)
        return _memo[key]

    for m in (mt, lion, adan, gravity):  # an older tree imports it into each kernel module
        if hasattr(m, "prepare_launches"):
            m.prepare_launches = _prep

N, REPS, ITERS = 10, 7, 300
ps = [torch.randn(64) for _ in range(N)]
gs = [torch.randn(64) for _ in range(N)]
st = [[torch.zeros(64) for _ in range(N)] for _ in range(4)]
lr_t = torch.tensor(1e-3)
LION = {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.01, "maximize": False}
CASES = {
    "lion": lambda: lion._triton_lion(ps, gs, st[0], lr=1e-3, **LION),
    "lion_lr_tensor": lambda: lion._triton_lion(ps, gs, st[0], lr=lr_t, **LION),
    "adan": lambda: adan._triton_adan(ps, gs, *st, lr=1e-3, beta1=0.02, beta2=0.08, beta3=0.01,
                                      bias_correction1=0.5, bias_correction2=0.5, bias_correction3_sqrt=0.7,
                                      eps=1e-8, weight_decay=0.01, no_prox=False, clip=1.0, maximize=False),
    "gravity": lambda: gravity._triton_gravity(ps, gs, st[0], lr=0.1, beta_hat=0.9, maximize=False),
}


def per_call_us(f) -> float:
    for _ in range(50):
        f()
    best = None
    for _ in range(REPS):
        t0 = time.thread_time_ns()
        for _ in range(ITERS):
            f()
        t = time.thread_time_ns() - t0
        best = t if best is None else min(best, t)
    return best / ITERS / 1000


if __name__ == "__main__":
    for name in sys.argv[1:] or CASES:
        print(f"{name} {per_call_us(CASES[name]):.2f}")
