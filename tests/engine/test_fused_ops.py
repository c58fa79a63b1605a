"""fused_ops against the torch code it replaces (RMSNorm, RotaryEmbedding + write_kv, silu * up).

The torch fallbacks must equal the original modules bit for bit. The Triton kernels run
on CPU under Triton's interpreter, which is chosen when ``triton.jit`` decorates a
kernel, i.e. when fused_ops is imported with TRITON_INTERPRET=1 already set. So one
subprocess (this module run with ``-m``) builds every case, runs the Triton path and
saves inputs and outputs; the tests compare those with the fallback and the modules.
Where CUDA is available the same cases also run on the GPU, in process.

Odd shapes on purpose: T = 1 and 7, hidden 1000 and intermediate 2500 (not powers of
2, several silu blocks), head_dim 80 and 96, Hq = 6 over Hkv = 2, q/k/v as strided
views of one fused projection output, positions out of order, shuffled cache slots.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.engine import fused_ops
from services.engine.model_config import RopeConfig
from services.engine.rope import RotaryEmbedding
from tests.engine.triton_interpreter import patch_interpreter

_MODULE = "tests.engine.test_fused_ops"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_WORKER_TIMEOUT_S = 300
_EPS = 1e-6
_BLOCK_SIZE = 16
_MAX_POSITIONS = 2048
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    op: str
    """rms_norm, add_rms_norm, gemma_rms_norm, gemma_add_rms_norm, silu_and_mul, gelu_and_mul, gelu_tanh_and_mul,
    rope_and_cache."""
    shape: tuple[int, ...]
    """x's shape for the norms, (T, I) for silu_and_mul, (T, Hq, Hkv, D) for rope_and_cache."""
    dtype_name: str

    @property
    def name(self) -> str:
        return f"{self.op}-{'x'.join(map(str, self.shape))}-{self.dtype_name}"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]


_SHAPES = {
    "rms_norm": [(1, 1000), (7, 1000), (7, 6, 80)],  # the last: a q/k norm over heads
    "add_rms_norm": [(1, 1000), (7, 1000)],
    "gemma_rms_norm": [(7, 1000), (7, 6, 80)],  # by (1 + weight), rounded once
    "gemma_add_rms_norm": [(7, 1000)],
    "silu_and_mul": [(1, 1000), (7, 2500)],
    "gelu_and_mul": [(1, 1000), (7, 2500)],
    "gelu_tanh_and_mul": [(1, 1000), (7, 2500)],
    "rope_and_cache": [(1, 6, 2, 80), (7, 6, 2, 80), (7, 4, 4, 96)],
}
CASES = [Case(op, shape, dtype) for op, shapes in _SHAPES.items() for shape in shapes for dtype in _DTYPES]
_BACKENDS = ["interpreter"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- inputs and runs


def _make_inputs(case: Case, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random inputs on CPU. Weights are random (not ones) so the scaling is exercised."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(case.dtype)

    if case.op.endswith("rms_norm"):
        return {"x": randn(*case.shape), "residual": randn(*case.shape), "weight": randn(case.shape[-1])}
    if case.op.endswith("_and_mul"):
        tokens, inter = case.shape
        return {"gate_up": 3 * randn(tokens, 2 * inter)}
    tokens, num_heads, num_kv_heads, head_dim = case.shape
    num_blocks = 2 * tokens + 3
    rotary = _rotary(head_dim)  # tables built on CPU: cos/sin on a GPU differ in the last bit
    return {
        "cos": rotary.cos,
        "sin": rotary.sin,
        "qkv": randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim),  # one fused projection output
        "positions": torch.randperm(_MAX_POSITIONS, generator=gen)[:tokens],
        "slot_mapping": torch.randperm(num_blocks * _BLOCK_SIZE, generator=gen)[:tokens],
        "kv_layer": randn(2, num_blocks, _BLOCK_SIZE, num_kv_heads, head_dim),  # untouched slots must stay
    }


def _split_qkv(qkv: torch.Tensor, case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # [T, (Hq + 2 Hkv) * D] -> strided views q [T, Hq, D], k/v [T, Hkv, D]
    tokens, num_heads, num_kv_heads, head_dim = case.shape
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    return (q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim),
            v.view(tokens, num_kv_heads, head_dim))


def _rotary(head_dim: int) -> RotaryEmbedding:
    return RotaryEmbedding(RopeConfig(theta=10000.0), head_dim, _MAX_POSITIONS, torch.device("cpu"))


def _run_fused(case: Case, inputs: dict[str, torch.Tensor], impl: str) -> dict[str, torch.Tensor]:
    plus_one = case.op.startswith("gemma_")
    if case.op.endswith("add_rms_norm"):
        out, summed = fused_ops.add_rms_norm(inputs["x"], inputs["residual"], inputs["weight"], _EPS, impl=impl,
                                             plus_one=plus_one)
        return {"out": out, "sum": summed}
    if case.op.endswith("rms_norm"):
        return {"out": fused_ops.rms_norm(inputs["x"], inputs["weight"], _EPS, impl=impl, plus_one=plus_one)}
    if case.op.endswith("_and_mul"):
        return {"out": getattr(fused_ops, case.op)(inputs["gate_up"], impl=impl)}
    q, k, v = _split_qkv(inputs["qkv"], case)
    kv_layer = inputs["kv_layer"].clone()
    q_rot, k_rot = fused_ops.rope_and_cache(q, k, v, inputs["positions"], inputs["cos"], inputs["sin"], kv_layer,
                                            inputs["slot_mapping"], impl=impl)
    return {"q": q_rot, "k": k_rot, "kv_layer": kv_layer}


def _reference_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # transformers' LlamaRMSNorm: normalise in float32, round, then scale in the model dtype
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + _EPS)).to(x.dtype)


def _reference_gemma_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # transformers' GemmaRMSNorm: normalise and scale by (1 + weight) in float32, round once
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _EPS) * (1.0 + weight.float())).type_as(x)


def _reference_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos/sin in x.dtype
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _run_modules(case: Case, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What fused_ops must compute, written as the reference implementations do."""
    if case.op.endswith("rms_norm"):
        norm = _reference_gemma_norm if case.op.startswith("gemma_") else _reference_norm
        if not case.op.endswith("add_rms_norm"):
            return {"out": norm(inputs["x"], inputs["weight"])}
        summed = inputs["x"] + inputs["residual"]
        return {"out": norm(summed, inputs["weight"]), "sum": summed}
    if case.op.endswith("_and_mul"):
        gate, up = inputs["gate_up"].chunk(2, dim=-1)
        act = {"silu_and_mul": F.silu, "gelu_and_mul": F.gelu,
               "gelu_tanh_and_mul": lambda g: F.gelu(g, approximate="tanh")}[case.op]
        return {"out": act(gate.contiguous()) * up.contiguous()}  # as two separate projections' outputs
    q, k, v = _split_qkv(inputs["qkv"], case)
    kv_layer = inputs["kv_layer"].clone()
    cos = inputs["cos"][inputs["positions"]].to(q.dtype).unsqueeze(1)
    sin = inputs["sin"][inputs["positions"]].to(q.dtype).unsqueeze(1)
    q_rot, k_rot = _reference_rotary(q, cos, sin), _reference_rotary(k, cos, sin)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_layer[0].view(-1, num_kv_heads, head_dim)[inputs["slot_mapping"]] = k_rot
    kv_layer[1].view(-1, num_kv_heads, head_dim)[inputs["slot_mapping"]] = v
    return {"q": q_rot, "k": k_rot, "kv_layer": kv_layer}


def _run_triton_cases(device: str) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """case name -> {"inputs", "outputs"} (on CPU), the outputs from the Triton path on device."""
    gen = torch.Generator().manual_seed(0)
    results = {}
    with torch.no_grad():
        for case in CASES:
            inputs = _make_inputs(case, gen)
            outputs = _run_fused(case, {n: t.to(device) for n, t in inputs.items()}, impl="triton")
            results[case.name] = {"inputs": inputs, "outputs": {n: t.cpu() for n, t in outputs.items()}}
    return results


# --------------------------------------------------------------------------- the interpreter subprocess


def _interpreter_main(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    kernel_type = type(fused_ops._rms_norm_kernel).__name__
    assert kernel_type == "InterpretedFunction", f"kernels were decorated as {kernel_type}, not interpreted"
    patch_interpreter()
    torch.save(_run_triton_cases("cpu"), out_path)


def _interpreted_results(out_dir: Path) -> dict:
    out_path = out_dir / "interpreted.pt"
    proc = subprocess.run(
        [sys.executable, "-m", _MODULE, str(out_path)], check=False, cwd=_REPO_ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=_WORKER_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out_path)


@pytest.fixture(scope="module", params=_BACKENDS)
def triton_results(request, tmp_path_factory) -> dict:
    if request.param == "cuda":
        return _run_triton_cases("cuda")
    return _interpreted_results(tmp_path_factory.mktemp("fused-ops"))


# --------------------------------------------------------------------------- comparisons


def _ulp_distance(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Number of bfloat16 values between got and want, elementwise (0 = same bits, -0 == +0)."""
    def ordered(x):  # sign-magnitude bits -> integers that count up through every bfloat16 value
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)

    return (ordered(got) - ordered(want)).abs()


def _assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                    small: tuple[float, float] = (0.0, 0.0), max_ulps: int = 1) -> None:
    """float32 to 1e-5; bfloat16 within ``max_ulps`` everywhere and off at all in under 1% of
    elements (reduction order, exp/rsqrt approximations; a wrong rounding step would flip ~half).
    Values both under ``small[0]`` in magnitude need only be within ``small[1]`` of each other,
    for the GELU gates (_small)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        if w.dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
            continue
        below, within = small
        near_zero = (g.float().abs() < below) & (w.float().abs() < below)
        assert ((g.float() - w.float()).abs()[near_zero] <= within).all(), name
        g, w = g[~near_zero], w[~near_zero]
        ulps = _ulp_distance(g, w)
        assert ulps.max() <= max_ulps, f"{name}: {int(ulps.max())} ulps apart"
        assert (ulps > 0).float().mean() < 0.01, f"{name}: {int((ulps > 0).sum())} of {ulps.numel()} differ"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_fallback_equals_the_modules(case):
    inputs = _make_inputs(case, torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = _run_fused(case, inputs, impl="torch"), _run_modules(case, inputs)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


def _tolerance(case: Case) -> dict:
    """_assert_matches' allowances: _small's, and 2 ulps for exact GELU, whose gate rounds to
    bfloat16 before the product: where torch's float32 erf is off (gates below about -3) the
    rounded gate can differ by one ulp, and the product's rounding adds one."""
    return {"small": _small(case), "max_ulps": 2 if case.op == "gelu_and_mul" else 1}


def _small(case: Case) -> tuple[float, float]:
    """Where the GELU gates' 1 + tanh or 1 + erf cancels (gates below about -3), float32's
    last-bit error in tanh/erf, which differs between torch (CPU), libdevice (GPU) and the
    interpreter, is amplified: tanh-GELU outputs under 1e-5 need only be within 1e-5 (a gate
    below about -5 gives 0 or ~1e-7 times up depending on whether float32 tanh reaches -1);
    exact-GELU outputs under 5e-3 within 5e-5 (1 + erf(g / sqrt 2) is ~1e-3..1e-7 for gates of
    -3..-5.5, where torch's float32 GELU itself is off from the exact value by up to 100 %)."""
    return {"gelu_tanh_and_mul": (1e-5, 1e-5), "gelu_and_mul": (5e-3, 5e-5)}.get(case.op, (0.0, 0.0))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_matches_the_torch_fallback(triton_results, case):
    result = triton_results[case.name]
    with torch.no_grad():
        _assert_matches(result["outputs"], _run_fused(case, result["inputs"], impl="torch"), **_tolerance(case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_matches_the_modules(triton_results, case):
    result = triton_results[case.name]
    with torch.no_grad():
        _assert_matches(result["outputs"], _run_modules(case, result["inputs"]), **_tolerance(case))


def test_rope_and_cache_writes_only_the_mapped_slots(triton_results):
    for case in CASES:
        if case.op != "rope_and_cache":
            continue
        result = triton_results[case.name]
        before, after = result["inputs"]["kv_layer"], result["outputs"]["kv_layer"]
        num_kv_heads, head_dim = case.shape[2], case.shape[3]
        written = torch.zeros(before[0].view(-1, num_kv_heads, head_dim).shape[0], dtype=torch.bool)
        written[result["inputs"]["slot_mapping"]] = True
        for half in (0, 1):
            slots_before = before[half].view(-1, num_kv_heads, head_dim)
            slots_after = after[half].view(-1, num_kv_heads, head_dim)
            assert torch.equal(slots_after[~written], slots_before[~written]), case.name
        values = after[1].view(-1, num_kv_heads, head_dim)[result["inputs"]["slot_mapping"]]
        assert torch.equal(values, _split_qkv(result["inputs"]["qkv"], case)[2]), case.name  # v copied exactly


def test_automatic_dispatch_picks_triton_on_cuda_only():
    assert fused_ops.triton is not None, "triton is not installed"
    assert fused_ops.use_triton(None, torch.device("cuda"))
    assert not fused_ops.use_triton(None, torch.device("cpu"))
    assert fused_ops.use_triton("triton", torch.device("cpu"))
    assert not fused_ops.use_triton("torch", torch.device("cuda"))


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
