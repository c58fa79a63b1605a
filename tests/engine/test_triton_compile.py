"""Every Triton kernel of the engine compiles for an H100 (sm_90), with the argument types its
wrapper launches it with, on this CPU-only machine (triton_compile.py says how). The kernels'
results are checked elsewhere, under the interpreter (test_paged_decode.py, test_fused_ops.py,
test_fused_moe.py) and on CUDA where there is one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from services.engine import fused_moe, fused_ops, paged_decode  # noqa: E402
from tests.engine.triton_compile import Launches, compile_for_cuda  # noqa: E402


def _compile_all(launches: list[Launches]) -> int:
    compiled = 0
    for each in launches:
        assert each.calls, f"{each.kernel.fn.__name__} was not launched"
        for args, kwargs in each.calls:
            assert compile_for_cuda(each.kernel, args, dict(kwargs)).asm["cubin"]
            compiled += 1
    return compiled


@pytest.mark.parametrize("dtype, lens_dtype, tables_dtype, window, softcap", [
    (torch.bfloat16, torch.int64, torch.int32, 0, 0.0),  # a decode graph's step: int64 lengths, int32 tables
    (torch.bfloat16, torch.int64, torch.int32, 4096, 50.0),  # a sliding-window, soft-capped layer (Gemma 2)
    (torch.float16, torch.int32, torch.int64, 100, 0.0),
    (torch.float32, torch.int32, torch.int32, 0, 0.0),
])
def test_paged_decode_kernels_compile(monkeypatch, dtype, lens_dtype, tables_dtype, window, softcap):
    split = {k: Launches(v) for k, v in paged_decode._SPLIT.items()}
    merge = {k: Launches(v) for k, v in paged_decode._MERGE.items()}
    monkeypatch.setattr(paged_decode, "_SPLIT", split)
    monkeypatch.setattr(paged_decode, "_MERGE", merge)
    q = torch.zeros(3, 32, 128, dtype=dtype)
    cache = torch.zeros(20, 16, 8, 128, dtype=dtype)
    tables = torch.zeros(3, 6, dtype=tables_dtype)
    lens = torch.tensor([90, 17, 1], dtype=lens_dtype)
    for specialize in (True, False):
        paged_decode.paged_decode_attention(q, cache, cache, tables, lens, 128 ** -0.5,
                                            specialize=specialize, window=window, softcap=softcap)
    assert _compile_all([*split.values(), *merge.values()]) == 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_op_kernels_compile(monkeypatch, dtype):
    launches = {name: Launches(getattr(fused_ops, name))
                for name in ("_rms_norm_kernel", "_silu_and_mul_kernel", "_rope_and_cache_kernel")}
    for name, each in launches.items():
        monkeypatch.setattr(fused_ops, name, each)
    x = torch.zeros(5, 4096, dtype=dtype)
    weight = torch.ones(4096, dtype=dtype)
    fused_ops.rms_norm(x, weight, 1e-5, impl="triton")
    fused_ops.add_rms_norm(x, x.clone(), weight, 1e-5, impl="triton")
    fused_ops.rms_norm(x, weight, 1e-6, impl="triton", plus_one=True)  # Gemma's
    fused_ops.silu_and_mul(torch.zeros(5, 2 * 14336, dtype=dtype), impl="triton")
    fused_ops.gelu_tanh_and_mul(torch.zeros(5, 2 * 14336, dtype=dtype), impl="triton")  # Gemma's gate
    fused_ops.gelu_and_mul(torch.zeros(5, 2 * 14336, dtype=dtype), impl="triton")
    qkv = torch.zeros(5, (32 + 2 * 8) * 128, dtype=dtype)
    q, k, v = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    kv_layer = torch.zeros(2, 10, 16, 8, 128, dtype=dtype)
    cos = sin = torch.zeros(64, 128)
    fused_ops.rope_and_cache(q.view(5, 32, 128), k.view(5, 8, 128), v.view(5, 8, 128), torch.arange(5), cos, sin,
                             kv_layer, torch.arange(5), impl="triton")
    assert _compile_all(list(launches.values())) == 7


def test_fused_moe_kernel_compiles(monkeypatch):
    gemm = Launches(fused_moe._grouped_gemm_kernel)
    monkeypatch.setattr(fused_moe, "_grouped_gemm_kernel", gemm)
    monkeypatch.setattr(fused_ops, "_silu_and_mul_kernel", Launches(fused_ops._silu_and_mul_kernel))
    experts, hidden, inter = 8, 256, 512
    fused_moe.fused_experts(torch.zeros(3, hidden, dtype=torch.bfloat16),
                            torch.zeros(experts, 2 * inter, hidden, dtype=torch.bfloat16),
                            torch.zeros(experts, hidden, inter, dtype=torch.bfloat16),
                            torch.tensor([[0, 1], [1, 7], [3, 0]]), torch.full((3, 2), 0.5), impl="triton")
    assert _compile_all([gemm]) == 2  # gate_up (no scale), then down (scaled by the routing weights)
