"""What a result was measured on: hardware, driver, library versions, commit, threads, cache sizes.

Every CSV row carries these columns, so a row copied out of its file still says where it came from.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["available_memory_bytes", "cache_bytes", "device_slug", "run_metadata"]

_REPO = Path(__file__).resolve().parent.parent


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        commit = out.stdout.strip()
        if not commit:  # a copied working tree (the GPU machine's) has no .git: whoever copied it names the commit
            return os.environ.get("FUSED_OPTIM_COMMIT", "unknown")
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import importlib.metadata as md
        return md.version("triton")
    except Exception:  # noqa: BLE001 - not installed: the column says so instead of failing the run
        return "not installed"


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # no nvidia-smi (containers): the driver's CUDA API version at least, e.g. 13000 -> "CUDA 13.0 driver"
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"CUDA {version.value // 1000}.{version.value % 1000 // 10} driver"
    except (OSError, AttributeError):
        pass
    return "unknown"


def device_slug(device: torch.device) -> str:
    """File-name part for the device: `cpu` or e.g. `cuda-nvidia-h100-80gb-hbm3`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return device.type


def cache_bytes(device: torch.device) -> int:
    """The last-level cache an input set must overflow to be timed from memory (L2 on GPUs, L3 on CPUs)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20))
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
            level = int((idx / "level").read_text())
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * mult
        if level >= 2:
            best = max(best, value)
    return best or (32 << 20)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def run_metadata(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
        driver = _nvidia_driver()
        cuda = torch.version.cuda or "none"
    else:
        hardware = f"{_cpu_name()} ({os.cpu_count()} logical cores)"
        driver = "n/a"
        cuda = torch.version.cuda or "none"
    return {
        "run_date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device.type,
        "hardware": hardware,
        "driver": driver,
        "torch": torch.__version__,
        "cuda": cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "threads": str(torch.get_num_threads()),
    }
