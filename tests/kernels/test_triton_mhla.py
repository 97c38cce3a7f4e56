"""`mhla_triton` and its stages against the quadratic `mhla_reference`: outputs and every
gradient (q, k, v, mixing).

Without a GPU the kernels run in Triton's interpreter on CPU. Triton decides interpreted
vs compiled when a function is decorated, its own `tl.sum` & co. included, so
TRITON_INTERPRET must be set before triton is first imported. When an earlier test file
has already imported triton without it, these tests cannot run in this process: they are
skipped here and `test_triton_mhla_in_fresh_process` runs this file in a subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from mhla_kernels import (  # noqa: E402
    block_outputs,
    block_summaries,
    mhla,
    mhla_reference,
    mix_summaries,
    triton_mhla,
)
from tests.kernels.inputs import make_inputs  # noqa: E402
from tests.numerics import rel_err  # noqa: E402

RUNS_HERE = ON_GPU or (
    isinstance(tl.standard.sum, InterpretedFunction)
    and isinstance(triton_mhla.summaries.block_summaries_fwd_kernel_sz, InterpretedFunction)
)
runs_here = pytest.mark.skipif(
    not RUNS_HERE, reason="triton was imported before TRITON_INTERPRET=1 was set: "
    "test_triton_mhla_in_fresh_process runs these checks in a subprocess"
)

DEVICE = "cuda" if ON_GPU else "cpu"
FP32_TOL = 1e-4
HALF_TOL = 2e-2
# The mixing gradient of a normalised output is nearly orthogonal to each row of Mc
# (scaling a row changes nothing but eps), so its norm is small: a floor keeps rounding
# noise from reading as a large relative error.
GRAD_FLOOR = 1e-3

# (B, N, H, d, dv, block_size, per_head): ragged last block, dv != d, several dv slices
# (dv 80 > 64), a block larger than a token tile (100: two tiles, the second ragged),
# head dims that are not powers of two, and the largest head dim (256).
SHAPES = [
    (2, 63, 2, 24, 40, 16, False),
    (2, 63, 2, 24, 40, 16, True),
    (1, 40, 3, 24, 80, 16, True),
    (1, 200, 2, 32, 16, 100, False),
    (1, 40, 1, 200, 72, 32, False),
]
IDS = [
    f"B{b}-N{n}-H{h}-d{d}-dv{dv}-C{c}-{'perhead' if p else 'shared'}"
    for b, n, h, d, dv, c, p in SHAPES
]


def _inputs(shape, dtype, seed=0):
    b, n, h, d, dv, c, per_head = shape
    q, k, v, mixing = make_inputs(b, n, h, d, dv, c, per_head=per_head, extra_blocks=1,
                                  seed=seed)
    ins = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    ins.append(mixing.to(DEVICE, torch.float32).requires_grad_())
    ref = [t.detach().double().requires_grad_() for t in ins]
    return ins, ref


def _check(out, ref_out, ins, ref, tol):
    g = torch.Generator().manual_seed(1)
    do = torch.randn(ref_out.shape, generator=g, dtype=torch.float64).to(ref_out.device)
    assert out.dtype == ins[2].dtype and out.shape == ref_out.shape
    err = rel_err(out.cpu(), ref_out.cpu())
    assert err < tol, f"output rel err {err:.2e} (tol {tol:.0e})"
    grads = torch.autograd.grad(out, ins, do.to(out.dtype))
    ref_grads = torch.autograd.grad(ref_out, ref, do)
    for name, ga, gr in zip("q k v mixing".split(), grads, ref_grads, strict=True):
        assert ga.shape == gr.shape
        err = rel_err(ga.cpu(), gr.cpu(), floor=GRAD_FLOOR)
        assert err < tol, f"d{name} rel err {err:.2e} (tol {tol:.0e})"


@runs_here
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "unnorm"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_mhla_triton_matches_reference_float32(shape, causal, normalize):
    ins, ref = _inputs(shape, torch.float32)
    kw = dict(causal=causal, normalize=normalize)
    out = triton_mhla.mhla_triton(*ins, shape[5], **kw)
    _check(out, mhla_reference(*ref, shape[5], **kw), ins, ref, FP32_TOL)


@runs_here
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mhla_triton_half_inputs(dtype, causal):
    """Within the error of rounding inputs, outputs and gradients to half precision."""
    shape = (2, 63, 2, 24, 40, 16, True)
    ins, ref = _inputs(shape, dtype)
    out = triton_mhla.mhla_triton(*ins, shape[5], causal=causal)
    _check(out, mhla_reference(*ref, shape[5], causal=causal), ins, ref, HALF_TOL)


@runs_here
def test_mhla_triton_head_dim_256():
    shape = (1, 20, 1, 256, 256, 8, False)
    ins, ref = _inputs(shape, torch.float32)
    out = triton_mhla.mhla_triton(*ins, 8, causal=True)
    _check(out, mhla_reference(*ref, 8, causal=True), ins, ref, FP32_TOL)


@runs_here
def test_mhla_triton_reads_strided_inputs():
    """q, k, v as slices of one fused projection `[B, N, H, 3 d]` (no copies)."""
    g = torch.Generator().manual_seed(0)
    qkv = (torch.rand(2, 50, 2, 3 * 16, generator=g) + 1e-3).to(DEVICE).requires_grad_()
    q, k, v = qkv.split(16, dim=-1)
    assert not q.is_contiguous()
    mixing = torch.rand(4, 4, generator=g).to(DEVICE).requires_grad_()
    out = triton_mhla.mhla_triton(q, k, v, mixing, 16, causal=True)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref_mixing = mixing.detach().double().requires_grad_()
    ref = mhla_reference(*ref_qkv.split(16, dim=-1), ref_mixing, 16, causal=True)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    assert rel_err(out, ref) < FP32_TOL
    grads = torch.autograd.grad(out, (qkv, mixing), do.float())
    ref_grads = torch.autograd.grad(ref, (ref_qkv, ref_mixing), do)
    for name, ga, gr in zip(("qkv", "mixing"), grads, ref_grads, strict=True):
        err = rel_err(ga, gr, floor=GRAD_FLOOR)
        assert err < FP32_TOL, f"d{name} rel err {err:.2e}"


@runs_here
def test_block_summaries_triton_matches_torch_stage():
    _, k, v, _ = make_inputs(2, 63, 2, 24, 40, 16, dtype=torch.float32)
    k, v = (t.to(DEVICE).requires_grad_() for t in (k, v))
    s, z = triton_mhla.block_summaries_triton(k, v, 16)
    s_ref, z_ref = block_summaries(k, v, 16)
    assert s.shape == s_ref.shape and z.shape == z_ref.shape
    assert rel_err(s, s_ref) < FP32_TOL and rel_err(z, z_ref) < FP32_TOL
    g = torch.Generator().manual_seed(1)
    ds, dz = (torch.randn(t.shape, generator=g).to(DEVICE) for t in (s, z))
    grads = torch.autograd.grad((s, z), (k, v), (ds, dz))
    ref_grads = torch.autograd.grad((s_ref, z_ref), (k, v), (ds, dz))
    for name, ga, gr in zip("kv", grads, ref_grads, strict=True):
        err = rel_err(ga, gr)
        assert err < FP32_TOL, f"d{name} rel err {err:.2e}"


@runs_here
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_block_outputs_triton_matches_torch_stage_with_block_start(causal):
    """The context-parallel shape: the local tokens are global blocks 2..6 of 7, and
    their rows of the mix come from every block's summaries."""
    q, k, v, mixing = make_inputs(1, 56, 2, 16, 24, 8, per_head=True, extra_blocks=2,
                                  dtype=torch.float32)
    q, k, v, mixing = (t.to(DEVICE).requires_grad_() for t in (q, k, v, mixing))
    s, z = block_summaries(k, v, 8)
    t, y = mix_summaries(s, z, mixing, causal=causal, block_start=2, num_rows=5)
    local = [x[:, 16:] for x in (q, k, v)]
    kw = dict(causal=causal, block_start=2)
    out = triton_mhla.block_outputs_triton(*local, t, y, mixing, 8, **kw)
    ref = block_outputs(*local, t, y, mixing, 8, **kw)
    assert rel_err(out, ref) < FP32_TOL
    g = torch.Generator().manual_seed(1)
    do = torch.randn(ref.shape, generator=g).to(DEVICE)
    leaves = (q, k, v, mixing)
    grads = torch.autograd.grad(out, leaves, do, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, leaves, do)
    for name, ga, gr in zip("q k v mixing".split(), grads, ref_grads, strict=True):
        err = rel_err(ga, gr, floor=GRAD_FLOOR)
        assert err < FP32_TOL, f"d{name} rel err {err:.2e}"


@runs_here
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_mhla_triton_packed_documents(causal):
    """`cu_seqlens` with backend="triton": the slots and their mixing run through the
    Triton kernels, equal to the reference run on every document alone."""
    shape = (2, 40, 2, 16, 24, 8, True)
    ins, ref = _inputs(shape, torch.float32, seed=3)
    cu = torch.tensor([0, 1, 13, 22, 40, 41, 60, 80])  # length-1 documents, ragged blocks
    out = mhla(*ins, 8, causal=causal, backend="triton", cu_seqlens=cu)
    _check(out, mhla_reference(*ref, 8, causal=causal, cu_seqlens=cu), ins, ref, FP32_TOL)


@pytest.mark.skipif(RUNS_HERE, reason="the checks run in this process")
def test_triton_mhla_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


@runs_here
def test_triton_available(monkeypatch):
    assert triton_mhla.triton_available(DEVICE)
    assert triton_mhla.triton_available("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_mhla.triton_available("cpu")


@runs_here
def test_mhla_triton_rejects_float64_and_large_head_dim():
    q, k, v, mixing = make_inputs(1, 16, 1, 8, 8, 8)
    with pytest.raises(TypeError, match="float64"):
        triton_mhla.mhla_triton(*(t.to(DEVICE) for t in (q, k, v, mixing)), 8)
    big = torch.rand(1, 16, 1, 300, device=DEVICE)
    with pytest.raises(ValueError, match="300"):
        triton_mhla.mhla_triton(big, big, big, mixing.float().to(DEVICE), 8)


@runs_here
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_mhla_backend_selection(causal):
    """`backend="triton"` reaches the kernels; "auto" keeps CPU tensors on the torch backend."""
    from mhla_kernels import mhla
    from mhla_kernels.functional import resolve_backend

    ins, ref = _inputs(SHAPES[0], torch.float32)
    assert resolve_backend("auto", ins[0], ins[2]) == ("triton" if ON_GPU else "torch")
    out = mhla(*ins, SHAPES[0][5], causal=causal, backend="triton")
    expect = mhla_reference(*ref, SHAPES[0][5], causal=causal)
    assert rel_err(out, expect) < FP32_TOL


@runs_here
def test_stage_functions_take_the_triton_backend():
    ins, _ = _inputs(SHAPES[1], torch.float32)
    q, k, v, mixing = (t.detach() for t in ins)
    c = SHAPES[1][5]
    s_t, z_t = block_summaries(k, v, c, backend="triton")
    s, z = block_summaries(k, v, c, backend="torch")
    assert rel_err(s_t, s) < FP32_TOL and rel_err(z_t, z) < FP32_TOL
    t, y = mix_summaries(s, z, mixing, causal=True)
    o_t = block_outputs(q, k, v, t, y, mixing, c, causal=True, backend="triton")
    o = block_outputs(q, k, v, t, y, mixing, c, causal=True, backend="torch")
    assert rel_err(o_t, o) < FP32_TOL
