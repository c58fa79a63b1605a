"""paged_decode_attention, run by Triton's interpreter on CPU (and compiled on a GPU where
one is present), against a per-row torch reference.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, that is when
paged_decode is first imported; so the kernels run in one child process started with it
set, over inputs this process saved, and the comparisons happen here. Without triton the
child fails and so does every comparison (CI installs it through the ``test`` extra).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.engine import attention
from services.engine.paged_decode import _default_partition, triton_available

_REPO_ROOT = Path(__file__).resolve().parents[2]

_RUN_IN_INTERPRETER = """
import sys, torch
from tests.engine.triton_interpreter import patch_interpreter
from services.engine.paged_decode import paged_decode_attention

patch_interpreter()
results = []
for kwargs in torch.load(sys.argv[1]):
    result = paged_decode_attention(**kwargs)
    results.append((result, result is kwargs.get("out")))
torch.save(results, sys.argv[2])
"""


@dataclass(frozen=True)
class Case:
    group: int
    """Query heads per KV head."""
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    context_lens: tuple[int, ...]
    partition_tokens: int | None
    """Small partitions give short rows several splits (None: the production default)."""
    index_dtype: torch.dtype = torch.int32
    """dtype of block_tables and context_lens."""
    give_out: bool = False
    """Pass a preallocated (NaN-filled) ``out``."""
    specialize: bool = True
    """False: the kernels launched for steps whose table widths vary (no integer specialisation)."""
    window: int = 0
    """A sliding window: each row attends to its last ``window`` positions (0: all of them)."""
    softcap: float = 0.0
    """Scores s become softcap * tanh(s / softcap) (0: not capped)."""

    @property
    def tolerance(self) -> float:
        # 16-bit: the kernel rounds the softmax weights to the cache dtype before P @ V.
        return {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[self.dtype]


CASES = {
    # lengths: 1, exactly one block, and 97 over four 32-token splits (the last one holds 1 token)
    "g1_d64_bs16_f32": Case(1, 2, 64, 16, torch.float32, (1, 16, 97), partition_tokens=32),
    # D=80 is padded to 128; 16-token tiles span two 8-token blocks
    "g3_d80_bs8_f32": Case(3, 2, 80, 8, torch.float32, (40, 8, 33), partition_tokens=16, give_out=True),
    "g4_d64_bs1_f32_int64": Case(4, 1, 64, 1, torch.float32, (5, 37), partition_tokens=16,
                                 index_dtype=torch.int64),
    # the default partition: one split, 64-token tiles over 32-token blocks
    "g4_d64_bs32_f32_default": Case(4, 2, 64, 32, torch.float32, (70, 32, 1), partition_tokens=None),
    "g4_d80_bs16_bf16": Case(4, 2, 80, 16, torch.bfloat16, (50, 17), partition_tokens=32),
    "g2_d64_bs8_f16": Case(2, 2, 64, 8, torch.float16, (29, 64), partition_tokens=16),
    "g8_d64_bs16_bf16": Case(8, 1, 64, 16, torch.bfloat16, (33,), partition_tokens=16),
    # 66 splits: the merge reads them in two chunks
    "g2_d64_bs16_f32_many_splits": Case(2, 1, 64, 16, torch.float32, (1050, 3), partition_tokens=16),
    "g1_d64_bs16_f32_unspecialized": Case(1, 2, 64, 16, torch.float32, (1, 16, 97), partition_tokens=32,
                                          specialize=False),
    "g4_d80_bs16_bf16_unspecialized": Case(4, 2, 80, 16, torch.bfloat16, (50, 17), partition_tokens=None,
                                           give_out=True, specialize=False),
    # sliding windows: rows longer and shorter than the window, starting mid-block and mid-split
    "g2_d64_bs16_f32_window": Case(2, 2, 64, 16, torch.float32, (100, 7, 37, 1), partition_tokens=16, window=37),
    "g4_d64_bs8_bf16_window_unspecialized": Case(4, 1, 64, 8, torch.bfloat16, (300, 21), partition_tokens=None,
                                                 window=50, specialize=False),
    # soft-capped scores (a cap of 2 bites: scores here reach ~5), with a window too
    "g2_d64_bs16_f32_softcap": Case(2, 2, 64, 16, torch.float32, (100, 7, 1), partition_tokens=16, softcap=2.0),
    "g4_d64_bs8_bf16_softcap_window": Case(4, 1, 64, 8, torch.bfloat16, (90, 21), partition_tokens=None, window=30,
                                           softcap=2.0, specialize=False),
}


def make_inputs(case: Case, seed: int) -> dict:
    """Random cache and queries; each row's blocks are distinct, shuffled ids, and the table is
    padded with one more (real, foreign) block so that an unmasked read would change the result."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(case.context_lens)
    max_blocks = max(math.ceil(n / case.block_size) for n in case.context_lens) + 1
    num_blocks = batch * max_blocks + 3
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    cache_shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    q = torch.randn(batch, case.group * case.num_kv_heads, case.head_dim, generator=gen)
    inputs = {
        "q": q.to(case.dtype),
        "k_cache": torch.randn(cache_shape, generator=gen).to(case.dtype),
        "v_cache": torch.randn(cache_shape, generator=gen).to(case.dtype),
        "block_tables": block_tables.to(case.index_dtype),
        "context_lens": torch.tensor(case.context_lens, dtype=case.index_dtype),
        "scale": 1.5 / math.sqrt(case.head_dim),  # not the usual 1/sqrt(D): a hard-coded scale fails
        "partition_tokens": case.partition_tokens,
    }
    if case.give_out:
        inputs["out"] = torch.full_like(inputs["q"], float("nan"))
    if not case.specialize:
        inputs["specialize"] = False
    if case.window:
        inputs["window"] = case.window
    if case.softcap:
        inputs["softcap"] = case.softcap
    return inputs


def reference(q, k_cache, v_cache, block_tables, context_lens, scale, window=0, softcap=0.0, **_) -> torch.Tensor:
    """Row by row in float32: gather the row's keys/values (its last ``window`` of them with a
    window), softmax(q k^T * scale) v."""
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    rows = []
    for b, n in enumerate(context_lens.tolist()):
        pos = torch.arange(max(0, n - window) if window else 0, n)
        blocks = block_tables[b, pos // block_size].long()
        k = k_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v_cache[blocks, pos % block_size].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        weights = scores.softmax(dim=-1)
        rows.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(rows)


_BACKENDS = ["interpreter"] + (["cuda"] if torch.cuda.is_available() else [])


def _on_gpu(names: list[str]) -> list[tuple[torch.Tensor, bool]]:
    """The same cases compiled and run on the GPU; results back on the CPU."""
    from services.engine.paged_decode import paged_decode_attention

    results = []
    for seed, name in enumerate(names):
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                  for k, v in make_inputs(CASES[name], seed).items()}
        result = paged_decode_attention(**kwargs)
        results.append((result.cpu(), result is kwargs.get("out")))
    return results


@pytest.fixture(scope="module", params=_BACKENDS)
def interpreted(request, tmp_path_factory) -> dict[str, tuple[torch.Tensor, bool]]:
    """Case name -> (paged_decode_attention's result, whether it was the given ``out``), all
    computed in one TRITON_INTERPRET=1 child process (or on the GPU: the ``cuda`` backend)."""
    if request.param == "cuda":
        return dict(zip(CASES, _on_gpu(list(CASES))))
    tmp = tmp_path_factory.mktemp("paged_decode")
    names = list(CASES)
    torch.save([make_inputs(CASES[name], seed) for seed, name in enumerate(names)], tmp / "inputs.pt")
    child = subprocess.run(
        [sys.executable, "-c", _RUN_IN_INTERPRETER, str(tmp / "inputs.pt"), str(tmp / "outputs.pt")],
        cwd=_REPO_ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, check=False,
        timeout=300,
    )
    assert child.returncode == 0, f"interpreter run failed:\n{child.stderr[-4000:]}"
    return dict(zip(names, torch.load(tmp / "outputs.pt")))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, interpreted):
    case = CASES[name]
    inputs = make_inputs(case, seed=list(CASES).index(name))
    result, wrote_into_out = interpreted[name]
    assert result.dtype == case.dtype
    assert wrote_into_out == case.give_out
    expected = reference(**inputs)
    torch.testing.assert_close(result.float(), expected, rtol=case.tolerance, atol=case.tolerance)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.dtype == torch.float32])
def test_reference_is_the_engine_decode_path(name):
    """The reference above computes what attention._decode_attention (SDPA over gathered blocks) does."""
    inputs = make_inputs(CASES[name], seed=0)
    kv_layer = torch.stack([inputs["k_cache"], inputs["v_cache"]])
    batch = attention.DecodeBatch(token_index=None, block_tables=inputs["block_tables"].long(),
                                  context_lens=inputs["context_lens"])
    expected = attention._decode_attention(inputs["q"], kv_layer, batch, inputs.get("window"), inputs.get("softcap"),
                                           inputs["scale"])
    torch.testing.assert_close(reference(**inputs), expected, rtol=1e-5, atol=1e-5)


def test_default_partition_comes_from_shapes():
    # (max_tokens, batch, Hkv): ~1024 programs were every row full, 64..1024 tokens, whole tiles
    assert _default_partition(8192, 1, 8) == 64  # 128 splits
    assert _default_partition(32768, 1, 8) == 256
    assert _default_partition(131072, 1, 8) == 1024
    assert _default_partition(8192, 8, 8) == 512  # 16 splits
    assert _default_partition(8200, 8, 8) == 576
    assert _default_partition(1024, 64, 8) == 512  # 2 splits
    assert _default_partition(8192, 64, 8) == 1024
    assert _default_partition(16, 1, 1) == 64


def test_triton_not_used_on_cpu():
    assert not triton_available(torch.device("cpu"))
