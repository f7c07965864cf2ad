"""The native build's machinery (fused_optim/_ext.py), with the compiler mocked (a real build takes a
minute; CI builds the real one first, `python -m fused_optim._ext`): the cache keyed by content, the
lock between processes, the announcements, when the CUDA part is built, and that collecting the tests
or `python -m bench --list` builds nothing. Plus: quiet by default (no notices at import or on a
CPU step), and `repr(opt)` says which impl runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fused_optim
from fused_optim import _ext, _ext_flags

ROOT = Path(__file__).resolve().parent.parent
TINY = {"fused_optim.cpp": "// ops\n", "cpu/a.cpp": "// kernels\n", "cpu/k.h": "// header\n",
        "cuda/x.cu": "// cuda\n", "math/m.h": "// math\n"}


def _tree(path: Path, files: dict[str, str] = TINY) -> Path:
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_compiler(monkeypatch):
    """cpp_extension.load writes an empty library instead of compiling (and "loads" it, as the real one
    does); load_library records the path."""
    calls, loaded = [], []
    cpp_extension = _ext.import_cpp_extension()

    def fake_load(name, sources, build_directory, **kw):
        assert not Path(build_directory, "lock").exists()  # a stale torch lock file is gone before the build
        calls.append((name, sources, build_directory))
        Path(build_directory, f"{name}.so").write_bytes(b"")
        loaded.append(str(Path(build_directory, f"{name}.so")))

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    return calls, loaded


# ------------------------------------------------------------------------------------ the cache key
def test_cache_directory_is_keyed_by_content_not_by_checkout(tmp_path, cache, monkeypatch):
    a = _ext.build_spec(False, _tree(tmp_path / "a"))
    assert a.directory.parent == cache and a.name.startswith("fused_optim_cpu_")
    # the same sources in another checkout (or venv with the same torch): the same build, shared
    assert _ext.build_spec(False, _tree(tmp_path / "b")).directory == a.directory
    # any source or header changed: another directory, never a rebuild of the first one
    for rel in ("cpu/a.cpp", "cpu/k.h", "math/m.h", "fused_optim.cpp"):
        other = _tree(tmp_path / rel.replace("/", "_"), {**TINY, rel: TINY[rel] + "// changed\n"})
        assert _ext.build_spec(False, other).directory != a.directory, rel
    # the CPU build does not compile the CUDA sources, so they are not part of its key
    cu = _tree(tmp_path / "cu", {**TINY, "cuda/x.cu": "// changed\n"})
    assert _ext.build_spec(False, cu).directory == a.directory
    # flags and compiler are part of it
    monkeypatch.setattr(_ext, "cxx_flags", lambda: ["-O2"])
    assert _ext.build_spec(False, tmp_path / "a").directory != a.directory
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    monkeypatch.setenv("CXX", "clang++")
    assert _ext.build_spec(False, tmp_path / "a").directory != a.directory


def test_cuda_build_key_covers_the_cuda_sources_and_targets(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(_ext, "cuda_toolkit_root", lambda: "/opt/cuda")
    root = _tree(tmp_path / "a")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    cuda90 = _ext.build_spec(True, root)
    assert cuda90.name.startswith("fused_optim_cuda_") and cuda90.cuda_arch_list == "9.0"
    assert cuda90.directory != _ext.build_spec(False, root).directory
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _ext.build_spec(True, root).directory != cuda90.directory
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    cu = _tree(tmp_path / "cu", {**TINY, "cuda/x.cu": "// changed\n"})
    assert _ext.build_spec(True, cu).directory != cuda90.directory


# ------------------------------------------------------------------------------------ build, reuse, announce
def test_first_use_builds_once_announced_then_reuses_silently(tmp_path, cache, fake_compiler, monkeypatch,
                                                              capsys):
    calls, loaded = fake_compiler
    root = _tree(tmp_path / "checkout1")
    monkeypatch.setattr(_ext, "csrc_dir", lambda: root)
    spec = _ext.build_spec(False)
    (spec.directory).mkdir(parents=True)
    (spec.directory / "lock").write_text("")  # left behind by a build that was killed inside torch

    path = _ext._jit_build(False)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fused_optim:")]
    assert len(lines) == 2, lines
    assert "building the native CPU kernels" in lines[0] and "about" in lines[0], lines[0]
    assert str(spec.directory) in lines[0]
    assert lines[1].startswith("fused_optim: built the native extension in")
    assert str(spec.directory) in lines[1]
    assert path == str(spec.directory / f"{spec.name}.so") and loaded == [path]
    # it compiled a snapshot of the sources inside its own directory, not the checkout
    (name, sources, build_directory), = calls
    assert name == spec.name and build_directory == str(spec.directory)
    assert sources == [str(spec.directory / "src" / s) for s in ("fused_optim.cpp", "cpu/a.cpp")]
    assert (spec.directory / "src" / "cpu" / "k.h").read_text() == TINY["cpu/k.h"]

    # a later process, and a second checkout of the same sources: loaded, nothing compiled or printed
    root2 = _tree(tmp_path / "checkout2")
    monkeypatch.setattr(_ext, "csrc_dir", lambda: root2)
    assert _ext._jit_build(False) == path
    assert len(calls) == 1 and loaded == [path, path]
    assert capsys.readouterr().err == ""


def test_an_unfinished_build_is_built_again(tmp_path, cache, fake_compiler, monkeypatch, capsys):
    """A library without the completion mark (a build killed mid-link) is never loaded: built again."""
    calls, loaded = fake_compiler
    root = _tree(tmp_path / "a")
    monkeypatch.setattr(_ext, "csrc_dir", lambda: root)
    spec = _ext.build_spec(False)
    spec.directory.mkdir(parents=True)
    (spec.directory / f"{spec.name}.so").write_bytes(b"truncated")
    _ext._jit_build(False)
    assert len(calls) == 1 and (spec.directory / _ext._DONE).exists()


_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from fused_optim import _ext
    root, log, go = map(Path, sys.argv[1:4])
    _ext.csrc_dir = lambda: root
    cpp_extension = _ext.import_cpp_extension()

    def fake_load(name, sources, build_directory, **kw):
        with open(log, "a") as f:
            f.write("build\\n")
        deadline = time.time() + 120
        while not go.exists() and time.time() < deadline:  # hold the lock until the test says go
            time.sleep(0.05)
        Path(build_directory, name + ".so").write_bytes(b"")
        print("LOADED", Path(build_directory, name + ".so"), flush=True)  # cpp_extension.load loads it

    cpp_extension.load = fake_load
    torch.ops.load_library = lambda path: print("LOADED", path, flush=True)
    _ext._jit_build(False)
""")


def _wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_two_processes_building_at_once_build_once(tmp_path):
    """The second process waits on the lock (and says so), then loads what the first one built."""
    root, log, go = _tree(tmp_path / "src"), tmp_path / "log", tmp_path / "go"
    env = _env(TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    args = [sys.executable, "-c", _RACER, str(root), str(log), str(go)]
    err_a, err_b = open(tmp_path / "a.err", "w+"), open(tmp_path / "b.err", "w+")
    a = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err_a, text=True)
    try:
        _wait_for(lambda: log.exists(), "the first build to start")
        b = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err_b, text=True)
        try:
            _wait_for(lambda: "waiting for another process" in (tmp_path / "b.err").read_text(),
                      "the second process to wait on the lock")
            go.write_text("")
            out_b, _ = b.communicate(timeout=120)
        finally:
            b.kill()
        out_a, _ = a.communicate(timeout=120)
    finally:
        a.kill()
    errs = (tmp_path / "a.err").read_text() + (tmp_path / "b.err").read_text()
    assert a.returncode == 0 and b.returncode == 0, errs
    assert log.read_text() == "build\n"  # compiled once
    lib_a, lib_b = (next(ln for ln in out.splitlines() if ln.startswith("LOADED")) for out in (out_a, out_b))
    assert lib_a == lib_b
    lines_b = [ln for ln in (tmp_path / "b.err").read_text().splitlines() if ln.startswith("fused_optim:")]
    assert len(lines_b) == 1 and "waiting for another process" in lines_b[0], lines_b  # no build of its own


# ------------------------------------------------------------------------------------ which parts are built
@pytest.fixture
def toolkit(tmp_path, monkeypatch) -> Path:
    """A CUDA build of torch and a toolkit with nvcc, whatever this machine has."""
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_ext_flags, "cuda_toolkit_root", lambda: str(tmp_path / "cuda"))
    monkeypatch.delenv("FUSED_OPTIM_WITH_CUDA", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return tmp_path / "cuda"


@pytest.mark.parametrize("switch,arch,visible,built", [
    ("", "", False, False),     # a toolkit but no GPU: the CUDA part is not worth its minutes
    ("", "", True, True),       # a visible GPU
    ("", "9.0", False, True),   # targets named: asked for (CI compiles it this way)
    ("1", "", False, True),     # asked for explicitly
    ("0", "9.0", True, False),  # switched off wins
])
def test_cuda_part_is_built_where_a_gpu_is_visible_or_asked_for(toolkit, monkeypatch, switch, arch, visible,
                                                                built):
    if switch:
        monkeypatch.setenv("FUSED_OPTIM_WITH_CUDA", switch)
    if arch:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
    wanted, why = _ext_flags.want_cuda()
    assert wanted is built
    assert (why == "") is built
    if not built and not switch:
        assert "TORCH_CUDA_ARCH_LIST" in why and "FUSED_OPTIM_WITH_CUDA=1" in why  # says how to ask


def test_cuda_part_needs_a_cuda_torch_and_nvcc(toolkit, monkeypatch):
    monkeypatch.setenv("FUSED_OPTIM_WITH_CUDA", "1")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _ext_flags.want_cuda() == (False, "this torch is not a CUDA build")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    (toolkit / "bin" / "nvcc").unlink()
    wanted, why = _ext_flags.want_cuda()
    assert not wanted and "nvcc" in why


def test_bad_cuda_switch_is_a_clear_error(toolkit, monkeypatch):
    monkeypatch.setenv("FUSED_OPTIM_WITH_CUDA", "yes")
    with pytest.raises(ValueError, match="FUSED_OPTIM_WITH_CUDA='yes'.*use 1"):
        _ext_flags.want_cuda()


# ------------------------------------------------------------------------------------ nothing builds early
def _no_aot(code: str) -> str:
    """Child code with the ahead-of-time build hidden, so that only the JIT path could build."""
    return "import sys; sys.modules['fused_optim._C'] = None\n" + code


@pytest.mark.parametrize("what", ["pytest --collect-only", "bench --list"])
def test_collecting_tests_and_bench_list_build_nothing(tmp_path, what):
    """On a cold cache: nothing is compiled (a build would announce itself, and with CXX=false fail)."""
    if what == "bench --list":
        code = "from bench.__main__ import main; raise SystemExit(main(['--list']))"
    else:
        code = ("import pytest; raise SystemExit(pytest.main(['--collect-only', '-q', '-p', "
                f"'no:cacheprovider', {str(ROOT / 'tests')!r}]))")
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", _no_aot(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=_env(TORCH_EXTENSIONS_DIR=str(cache), CXX="false"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "fused_optim: building" not in proc.stderr and "native extension is unavailable" not in proc.stderr
    assert not (cache.exists() and any(cache.iterdir())), sorted(cache.iterdir())
    if what == "bench --list":
        assert "native   no  not built yet" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------ quiet by default
def test_no_cuda_runtime_notice_when_the_build_tooling_loads(tmp_path):
    """torch's cpp_extension says `No CUDA runtime is found, using CUDA_HOME=...` on import wherever a
    toolkit is installed without a GPU; loading it through _ext keeps that line out of the user's console."""
    env = _env(CUDA_HOME=str(tmp_path))  # a toolkit root that exists: torch would announce it
    raw = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], capture_output=True,
                         text=True, env=env, timeout=300)
    if not torch.cuda.is_available():
        assert "No CUDA runtime is found" in raw.stderr  # the premise: torch prints it here
    ours = subprocess.run([sys.executable, "-c", "from fused_optim import _ext; _ext.import_cpp_extension()"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert ours.returncode == 0, ours.stderr
    assert "No CUDA runtime" not in ours.stderr, ours.stderr


def test_import_and_a_cpu_step_print_nothing():
    """Nothing on stderr and no warning (as errors) for `import fused_optim` and an auto-mode CPU step,
    with the extension built (the parent loads it first: this is not about the build)."""
    assert _ext.load().available
    code = textwrap.dedent("""
        import torch, fused_optim
        model = torch.nn.Linear(8, 2)
        for cls in (fused_optim.Lion, fused_optim.Adan, fused_optim.Gravity, fused_optim.GradientEquilibrium):
            opt = cls(model.parameters(), lr=1e-3)
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
    """)
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# ------------------------------------------------------------------------------------ which impl runs
def test_repr_shows_the_impl_that_runs_per_device():
    p = torch.nn.Parameter(torch.randn(3))
    auto = fused_optim.Lion([p], lr=1e-3)
    assert auto.impl is None  # the request
    text = repr(auto)
    assert text.startswith("Lion (") and f"impl: auto (cpu: {auto.impl_for('cpu')})" in text, text
    assert "lr: 0.001" in text  # torch's group listing stays
    assert "impl: foreach (cpu: foreach)" in repr(fused_optim.Lion([p], lr=1e-3, impl="foreach"))
    assert "impl: auto (no parameters)" in repr(fused_optim.Lion([{"params": []}], lr=1e-3))


def test_repr_changes_nothing():
    """Dynamo (torch 2.11) calls repr on the optimizer while it builds a compiled step's guards; a repr that
    filled the impl cache then failed its own guard ('Guard failed on the same frame it was created')."""
    opt = fused_optim.Lion([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    before = dict(vars(opt))
    repr(opt)
    assert vars(opt) == before and opt._impl_cache == {}


def test_gpu_tests_without_cuda_are_one_summary_line(tmp_path):
    """Without CUDA the gpu tests are deselected with one line saying why (not one skip line each);
    `-m gpu` keeps them, each skipped with that reason."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: its gpu tests run")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (tmp_path / "test_x.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n\n"
                                       "@pytest.mark.gpu\ndef test_b():\n    pass\n\n"
                                       "def test_c():\n    pass\n")

    def run(*args):
        env = _env(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-ra", "-p",
                               "no:cacheprovider", "test_x.py", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300).stdout

    out = run()
    assert "1 passed, 2 deselected" in out and "2 gpu tests deselected: no CUDA device here" in out, out
    assert "SKIPPED" not in out
    out = run("-m", "gpu")
    assert "2 skipped" in out and out.count("no CUDA device here") == 2, out
