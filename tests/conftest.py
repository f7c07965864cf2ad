"""Session-wide test policy.

- `gpu`-marked tests need a CUDA device. Without one they are deselected with one line of summary
  instead of a skip line each, unless the `-m` expression names `gpu` (e.g. `pytest -m gpu`): then they
  are kept, and skip with that reason.
- Collecting the tests builds nothing: the impl lists are decided from what could run
  (`reliability_util.cpu_impls`). A test parametrized with impl="native" builds or loads the extension
  when it runs, and is skipped with the build's reason if that failed.
"""
from __future__ import annotations

import pytest
import torch

NO_CUDA = "no CUDA device here: `pytest -m gpu` on a CUDA machine runs the gpu tests"


def _wants_gpu_tests(config: pytest.Config) -> bool:
    return "gpu" in (config.getoption("markexpr", "") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    if _wants_gpu_tests(config):
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))
        return
    keep = [item for item in items if item.get_closest_marker("gpu") is None]
    config.hook.pytest_deselected(items=gpu)
    items[:] = keep
    config.stash[_GPU_DESELECTED] = len(gpu)


_GPU_DESELECTED = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    n = config.stash.get(_GPU_DESELECTED, 0)
    if n:
        terminalreporter.write_line(f"{n} gpu tests deselected: {NO_CUDA}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("impl") == "native":
        from fused_optim._backends import impl_status

        st = impl_status("native", "cpu")
        if not st.available:
            pytest.skip(f"native: {st.reason}")
