"""The CUDA kernels of csrc/cuda/, executed on the CPU by the emulated build (tests/cuda_emulation.py,
csrc/cuda/emulation/): the same kernel source and host launchers, CUDA's execution model emulated (blocks in
random order, threads as fibers with real barriers and warp shuffles, checked shared memory).

Every CUDA op runs emulated on CPU tensors through fused_optim's own launchers (fused_optim._native) and is
held to the native CPU kernels' test rules: the CPU test functions of test_native.py,
test_native_composites.py, test_native_amp_capturable.py and test_native_lowbit.py are rerun here with their
ops routed to the emulated build (exact where the CPU kernels are exact: the emulated build compiles with
-ffp-contract=off). Then adversarial lists (>= 200 tensors, odd sizes, unaligned views, multi-chunk and
zero-size tensors; the lowbit ops' bit for bit against the CPU op),
schedule independence, the emulator's own race/shuffle checks, the AddressSanitizer + UBSan build, and a
coverage check: every kernel instantiation compiled into the build is launched by this file.
"""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cuda_emulation
import test_native as tn
import test_native_amp_capturable as ta
import test_native_composites as tc
import test_native_lowbit as tl

pytestmark = pytest.mark.cuda_emulated


@pytest.fixture(scope="module")
def emu():
    return cuda_emulation.build()


@pytest.fixture
def routed(emu):
    with cuda_emulation.emulated_native():
        emu._emu_set_seed(0)
        yield emu


# ------------------------------------------------------- the native CPU tests, on the emulated kernels
def _rerun(fn, prefix):
    """A test of this module running `fn` (a CPU/CUDA test of another file) with device="cpu" and the ops
    routed to the emulated build: fn's own parametrization minus `device`."""
    sig = inspect.signature(fn)
    has_device = "device" in sig.parameters

    def test(**kwargs):
        if has_device:
            kwargs["device"] = "cpu"
        fn(**kwargs)

    test.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "device"])
    marks = [m for m in getattr(fn, "pytestmark", [])
             if not (m.name == "parametrize" and m.args[0] == "device")]
    test.pytestmark = marks + [pytest.mark.usefixtures("routed")]
    test.__name__ = f"test_{prefix}_{fn.__name__[5:]}"
    test.__doc__ = fn.__doc__
    return test


_RERUN = {
    "native": (tn, ["test_fp32_matches_forloop", "test_fp64_matches_forloop", "test_low_precision_spec9",
                    "test_amp_hooks", "test_stats_match_torch", "test_stats_options",
                    "test_stats_nan_propagates",
                    "test_lowp_vector_loop_is_bit_equal_to_scalar_loop", "test_stats_lowp_equal_fp32_upcast",
                    "test_op_errors_are_clear"]),
    "composites": (tc, ["test_lookahead_sync_fp32", "test_lookahead_sync_lowp", "test_sam_norms_fp32",
                        "test_sam_norms_lowp", "test_sam_perturb_and_restore_fp32", "test_sam_perturb_lowp",
                        "test_sam_restore_copies_bits", "test_muon_momentum_fp32", "test_muon_momentum_lowp",
                        "test_muon_apply_fp32", "test_muon_apply_lowp",
                        "test_muon_end_to_end_matches_forloop_fp32",
                        "test_neuro_optima_fp32", "test_neuro_optima_lowp", "test_float64_all",
                        "test_lowp_vector_loops_bit_equal_scalar_loop", "test_many_tensors_one_call",
                        "test_zero_size_and_empty_lists"]),
    "amp_capturable": (ta, ["test_amp_equals_torch_unscale_then_plain_step",
                            "test_amp_strided_grad_beside_contiguous_param", "test_found_inf_writes_nothing",
                            "test_stats_see_the_rounded_unscaled_grad", "test_device_scalars_track_forloop",
                            "test_device_scalars_exact_where_fp32_is_exact", "test_device_scalars_with_amp"]),
    # the lowbit ops against reference_step over the emulated fp32 op, bit for bit
    "lowbit": (tl, ["test_lowbit_op_equals_reference_step", "test_amp_scaled_step_and_found_inf_skip",
                    "test_state_dict_round_trip_resumes_bit_exactly", "test_capturable_tensor_step_and_lr",
                    "test_nonfinite_values_as_the_reference", "test_launcher_found_inf_skips_everything",
                    "test_gravity_rows_split_between_op_and_reference_path",
                    "test_op_refuses_bad_arguments_before_writing", "test_muon_lowbit_ops_equal_reference_step",
                    "test_muon_lowbit_ops_refuse_bad_arguments"]),
}
for _prefix, (_mod, _names) in _RERUN.items():
    for _name in _names:
        _t = _rerun(getattr(_mod, _name), _prefix)
        globals()[_t.__name__] = _t
del _prefix, _mod, _names, _name, _t


# ------------------------------------------------------------------------------------ adversarial lists
def _adversarial(dtype, seed, n=211):
    """n tensors: odd sizes, every 17th empty, three over two 65536-element chunks, and every third one
    an unaligned view (storage offset 1..3 elements: the kernels' scalar path) of a NaN-filled storage.
    The sizes are the same for every seed (one seed per list of an op)."""
    g = torch.Generator().manual_seed(0)
    sizes = [0 if i % 17 == 3 else int(torch.randint(1, 700, (1,), generator=g)) | 1 for i in range(n)]
    sizes[5] = sizes[50] = sizes[100] = 2 * 65536 + 3
    g = torch.Generator().manual_seed(seed)
    out, bases = [], []
    for i, size in enumerate(sizes):
        off = 1 + i % 3 if i % 3 == 0 else 0
        base = torch.full((size + off + tn.GUARD,), float("nan"), dtype=dtype)
        t = base[off:off + size]
        t.copy_(torch.randn(size, generator=g, dtype=torch.float64))
        out.append(t)
        bases.append((base, off, size))
    return out, bases


def _guards_intact(bases):
    for base, off, size in bases:
        outside = torch.cat([base[:off], base[off + size:]])
        assert torch.isnan(outside).all(), "a kernel wrote outside its tensor"


@pytest.mark.usefixtures("routed")
@pytest.mark.parametrize("name", ["lion", "gravity", "adan_no_prox_clip_max", "equilibrium_wd_max"])
def test_adversarial_lists_match_forloop(name):
    """>= 200 tensors in one call: odd sizes, zero-size and multi-chunk tensors, unaligned views (> 1 block
    per reduction), two steps against the forloop reference with the native CPU tests' tolerance."""
    case = tn.CASES[name]
    lists = [_adversarial(torch.float32, seed=10 + j) for j in range(2 + case["n_state"])]
    if name.startswith("adan"):
        for t in lists[3][0]:
            t.abs_()
    nat = [lst for lst, _ in lists]
    ref = [[t.clone() for t in lst] for lst in nat]
    for k in (1, 2):
        kw = case["kwargs"](k)
        grads = [t.clone() for t in nat[1]]  # the grads are only read (no AMP)
        case["forloop"](ref[0], grads, *ref[2:], **kw)
        case["native"](nat[0], grads, *nat[2:], **kw)
        exact = case["exact_params"]
        tn._assert_close(nat[0], ref[0], k, f"{name} params", exact=exact)
        for j in range(2, len(nat)):
            tn._assert_close(nat[j], ref[j], k, f"{name} state{j - 2}", exact=case["exact_state"])
    for _, bases in lists:
        _guards_intact(bases)


@pytest.mark.usefixtures("routed")
def test_adversarial_lists_reductions(routed):
    """Per-tensor stats and L2 norms of 211 adversarial tensors against fp64 torch reductions."""
    ts, bases = _adversarial(torch.float32, seed=3)
    stats = routed.multi_tensor_stats(ts)
    norms = routed.multi_tensor_l2norm(ts)
    for i, t in enumerate(ts):
        x = t.double()
        if x.numel() == 0:
            assert stats[i].tolist() == [0.0, 0.0, 0.0] and norms[i].item() == 0.0
            continue
        assert stats[i, 0].item() == x.abs().amax().item()
        assert abs(stats[i, 1].item() - x.sum().item()) <= 1e-5 * x.abs().sum().item()
        assert abs(stats[i, 2].item() - x.square().sum().item()) <= 1e-5 * x.square().sum().item()
        assert abs(norms[i].item() - x.norm().item()) <= 1e-6 * x.norm().item()
    _guards_intact(bases)


def _as_bits(t):
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "amp"])
@pytest.mark.parametrize("fmt", [1, 2], ids=["bf16", "8bit"])
@pytest.mark.parametrize("p_dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lowbit_adversarial_lists_equal_the_cpu_op(emu, p_dt, fmt, amp):
    """adan_lowbit_ over 61 tensors in one call (odd sizes, two over two 65536-element chunks, last
    quantization blocks of 1 element, views at odd storage offsets, a zero-size tensor): the emulated CUDA
    kernel equals the native CPU op bit for bit (params, the grads it writes back under AMP, bf16 state,
    8-bit codes and block scales), with param rounding on, and writes nothing outside its tensors."""
    from fused_optim import _native

    g = torch.Generator().manual_seed(5)
    sizes = [int(torch.randint(1, 3000, (1,), generator=g)) for _ in range(58)] + [2 * 65536 + 257, 0, 65536 + 1]
    sizes[7] = 256 * 9 + 1
    sdt = torch.bfloat16 if fmt == 1 else torch.uint8

    def lst(dtype, fill, positive=False):
        out, bases = [], []
        for i, n in enumerate(sizes):
            off = i % 3
            base = torch.full((n + off + 8,), fill, dtype=dtype) if dtype != torch.uint8 else \
                torch.full((n + off + 8,), 0xAB, dtype=dtype)
            t = base[off:off + n]
            if dtype == torch.uint8:
                t.copy_(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8))
            else:
                x = torch.randn(n, generator=g)
                t.copy_(x.abs() + 0.1 if positive else x)
            out.append(t)
            bases.append((base, off, n))
        return out, bases

    lists = [lst(p_dt, float("nan")), lst(p_dt, float("nan"))]
    signed = [True, False, True, True]
    lists += [lst(sdt, float("nan"), positive=not sgn) for sgn in signed]
    absmax = [torch.rand((n + 255) // 256, generator=g) + 0.5 for _ in signed for n in sizes] if fmt == 2 else []
    tables = _native._lowbit_tables(tuple(signed)) if fmt == 2 else torch.zeros(0)
    amp_args = (torch.full((1,), 4.0), torch.zeros(1)) if amp else (None, None)
    tensor_index = list(range(3, 3 + len(sizes)))

    def call(ops, ls, am):
        ops.adan_lowbit_(*ls, am, tables, [int(x) for x in signed], fmt, True, 123, 9, None, tensor_index,
                         1e-2, 0.98, 0.92, 0.99, 0.5, 0.6, 0.7, 1e-8, 0.02, False, torch.tensor([0.8]), True,
                         *amp_args)

    ref_lists = [[t.clone() for t in ts] for ts, _ in lists]
    ref_absmax = [a.clone() for a in absmax]
    call(tn._ext.ops(), ref_lists, ref_absmax)
    call(emu, [ts for ts, _ in lists], absmax)
    for k, ((ts, _), refs) in enumerate(zip(lists, ref_lists)):
        for i, (x, y) in enumerate(zip(ts, refs)):
            assert torch.equal(_as_bits(x), _as_bits(y)), f"list {k} tensor {i} (numel {x.numel()}) differs"
    for i, (x, y) in enumerate(zip(absmax, ref_absmax)):
        assert torch.equal(_as_bits(x), _as_bits(y)), f"block scales {i} differ"
    for ts, bases in lists:
        for base, off, n in bases:
            outside = torch.cat([base[:off], base[off + n:]])
            if outside.dtype == torch.uint8:
                assert (outside == 0xAB).all(), "a kernel wrote outside its tensor"
            else:
                assert torch.isnan(outside).all(), "a kernel wrote outside its tensor"


# ------------------------------------------------------------------------------- the emulator itself
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reductions_do_not_depend_on_the_schedule(emu, seed):
    """The reductions combine partials in a fixed order: the same bits under any thread and block order."""
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(n, generator=g) for n in (1, 513, 65537, 3000)]
    emu._emu_set_seed(0)
    ref = (emu.multi_tensor_stats(ts, ts, 0.5, True), emu.multi_tensor_l2norm(ts))
    emu._emu_set_seed(seed)
    out = (emu.multi_tensor_stats(ts, ts, 0.5, True), emu.multi_tensor_l2norm(ts))
    assert all(torch.equal(a, b) for a, b in zip(ref, out))


def test_race_detector_catches_a_missing_barrier(emu):
    """A block reduction without the barrier between the shared writes and the reads is reported, under
    every schedule (either the read comes first, or in the same barrier interval as the write)."""
    for seed in range(5):
        emu._emu_set_seed(seed)
        with pytest.raises(RuntimeError, match="shared-memory race on slots"):
            emu._emu_racy_sum(torch.ones(64))


def test_warp_shuffles_have_lane_semantics(emu):
    lanes = list(range(32))
    assert emu._emu_shuffle_probe(0).tolist() == [l + 3 if l + 3 < 32 else l for l in lanes]  # down
    assert emu._emu_shuffle_probe(1).tolist() == [l ^ 5 for l in lanes]  # xor
    assert emu._emu_shuffle_probe(2).tolist() == [l - 2 if l >= 2 else l for l in lanes]  # up
    assert emu._emu_shuffle_probe(3).tolist() == [7] * 32  # broadcast
    with pytest.raises(RuntimeError, match="mask does not name it"):
        emu._emu_shuffle_probe(4)


def test_graph_capture_path_keeps_staging(emu):
    """Under (emulated) stream capture the launch tables' staging buffers are kept; the results stay right."""
    g = torch.Generator().manual_seed(8)
    p = [torch.randn(n, generator=g) for n in (3, 70000)]
    gr = [torch.randn(n, generator=g) for n in (3, 70000)]
    m = [torch.zeros(n) for n in (3, 70000)]
    ref = [[t.clone() for t in lst] for lst in (p, m)]
    tn._forloop_lion(ref[0], gr, ref[1], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
    emu._emu_set_capturing(True)
    try:
        emu.lion_(p, gr, m, 0.1, 0.9, 0.99, 0.0, False)
        emu.muon_apply_(p, gr, [1.0, 2.0], 0.0, 0.0)  # the second staging path (the scales)
    finally:
        emu._emu_set_capturing(False)
    tn._assert_close(m, ref[1], 1, "exp_avgs", exact=True)


# ------------------------------------------------------------------------------------------- coverage
def test_every_kernel_instantiation_is_launched(emu):
    """Every __global__ kernel of csrc/cuda/ and every instantiation of it compiled into the build (the host
    code's dtype dispatch instantiates them) is launched by the sweep, which runs each op for each storage
    type combination, with and without AMP, and checks each call against the native CPU kernels."""
    emu._emu_reset_launches()
    cuda_emulation.sweep(emu, ref=tn._ext.ops())
    counts = {k: v for k, v in cuda_emulation.launches(emu).items() if not k.startswith("fo_emu::")}
    never = sorted(k for k, v in counts.items() if v == 0)
    assert not never, "kernel instantiations never launched in the emulated suite:\n" + "\n".join(never)
    src = "".join(p.read_text() for p in (cuda_emulation.ROOT / "csrc" / "cuda").glob("*.cu*"))
    kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", src))
    assert kernels, "no __global__ kernel found in csrc/cuda"
    launched = {name.split("<")[0] for name in counts}
    assert kernels <= launched, f"kernels of csrc/cuda never launched emulated: {sorted(kernels - launched)}"


# ---------------------------------------------------------------------------------- sanitizer build
_ASAN_SCRIPT = textwrap.dedent("""
    # only torch and the build module: importing triton under the ASan runtime trips an ASan check
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    os.environ.pop("LD_PRELOAD", None)  # the compiler and ninja run without the ASan runtime
    import cuda_emulation
    ops = cuda_emulation.build(sanitize=True)
    ops._emu_set_seed(7)
    cuda_emulation.sweep(ops)
    # adversarial lists: each tensor its own allocation (ASan's redzones right at its ends), unaligned views
    g = torch.Generator().manual_seed(1)
    sizes = [0, 1, 3, 5, 7, 65537, 1029]
    own = lambda: [torch.randn(n, generator=g) for n in sizes]
    p, gr, m = own(), own(), own()
    ops.lion_(p, gr, m, 1e-3, 0.9, 0.99, 0.1, False)
    views = lambda: [torch.randn(n + 1, generator=g)[1:] for n in sizes]
    pv, gv, mv = views(), views(), views()
    st = ops.multi_tensor_stats(gv, pv, 0.5, True)
    ops.gravity_(pv, gv, mv, st, 1e-3, 0.9, False)
    ops.multi_tensor_l2norm(gv, pv)
    print("ASAN-OK", flush=True)
    if {oob!r}:
        y = torch.randn(5)
        ops._emu_read_past_end(y)
        print("OOB-NOT-CAUGHT", flush=True)
""")


def _run_sanitized(oob=False):
    env = cuda_emulation.sanitizer_env()
    script = _ASAN_SCRIPT.format(tests=str(Path(__file__).resolve().parent), oob=oob)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=1500, cwd=str(cuda_emulation.ROOT))


def test_sanitizer_build_runs_every_kernel_clean():
    """The ASan + UBSan build runs the whole sweep and adversarial lists (every tensor its own allocation, so
    a read or write past a tensor hits ASan's redzone) without a report; a deliberate read one element past
    a tensor's end is caught (the sanitizer is really on)."""
    res = _run_sanitized(oob=True)
    out = res.stdout + res.stderr
    assert "ASAN-OK" in res.stdout, f"sanitized run failed:\n{out[-6000:]}"
    assert "OOB-NOT-CAUGHT" not in res.stdout and "heap-buffer-overflow" in out, \
        f"the deliberate out-of-bounds read was not caught:\n{out[-3000:]}"
