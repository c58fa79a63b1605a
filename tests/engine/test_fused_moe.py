"""fused_experts (services/engine/fused_moe.py) against moe.Experts' per-expert loop.

The Triton kernels run on CPU under Triton's interpreter, in one child process (this module
run with ``-m``, TRITON_INTERPRET=1) that builds every case, runs the fused path and saves
inputs and outputs; the tests compare them with the loop here. Where CUDA is available the
same cases also run on the GPU, in process.

Cases: one token (a decode step at batch 1), experts with more rows than a block (two
blocks of one expert), experts nobody chose, sizes that are not multiples of the tiles,
K = 4 of 16 experts, bfloat16 and float32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.engine import fused_moe
from services.engine.moe import Experts

_REPO_ROOT = Path(__file__).resolve().parents[2]
_MODULE = "tests.engine.test_fused_moe"
_WORKER_TIMEOUT_S = 600


@dataclass(frozen=True)
class Case:
    tokens: int
    top_k: int
    experts: int
    hidden: int
    intermediate: int
    dtype: torch.dtype
    only_experts: tuple[int, ...] | None = None
    """Route every token to these experts only (the others get no rows)."""

    @property
    def name(self) -> str:
        only = "" if self.only_experts is None else "_only" + "-".join(map(str, self.only_experts))
        return f"t{self.tokens}_k{self.top_k}_e{self.experts}_h{self.hidden}_i{self.intermediate}" \
               f"_{str(self.dtype).removeprefix('torch.')}{only}"


CASES = [
    Case(1, 2, 8, 64, 96, torch.bfloat16),
    Case(1, 2, 8, 64, 96, torch.float32),
    Case(40, 2, 4, 80, 48, torch.bfloat16),  # ~20 rows per expert: 32-row blocks
    Case(100, 2, 4, 64, 64, torch.float32),  # ~50 rows per expert: 64-row blocks, some experts two
    Case(7, 2, 8, 128, 160, torch.float32, only_experts=(2, 5)),
    Case(5, 4, 16, 96, 64, torch.bfloat16),
]


def _make_inputs(case: Case, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.5).to(case.dtype)

    scores = torch.rand(case.tokens, case.experts, generator=gen)
    if case.only_experts is not None:
        allowed = torch.zeros(case.experts, dtype=torch.bool)
        allowed[list(case.only_experts)] = True
        scores = scores.masked_fill(~allowed, -1.0)
    weights, expert_ids = torch.topk(torch.softmax(scores, dim=-1), case.top_k, dim=-1)
    return {"x": randn(case.tokens, case.hidden),
            "gate_up_proj": randn(case.experts, 2 * case.intermediate, case.hidden) / case.hidden ** 0.5,
            "down_proj": randn(case.experts, case.hidden, case.intermediate) / case.intermediate ** 0.5,
            "expert_ids": expert_ids, "weights": weights}


def _run_fused_cases(device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    results = {}
    for case in CASES:
        inputs = _make_inputs(case, gen)
        on_device = {n: t.to(device) for n, t in inputs.items()}
        out = fused_moe.fused_experts(**on_device, impl="triton")
        results[case.name] = {"inputs": inputs, "out": out.cpu()}
    return results


def _interpreter_main(out_path: str) -> None:
    from tests.engine.triton_interpreter import patch_interpreter

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    patch_interpreter()
    torch.save(_run_fused_cases("cpu"), out_path)


_BACKENDS = ["interpreter"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=_BACKENDS)
def fused_results(request, tmp_path_factory) -> dict:
    if fused_moe.triton is None:
        pytest.fail("triton is not installed (it comes with torch on Linux)")
    if request.param == "cuda":
        return _run_fused_cases("cuda")
    out_path = tmp_path_factory.mktemp("fused-moe") / "interpreted.pt"
    proc = subprocess.run([sys.executable, "-m", _MODULE, str(out_path)], check=False, cwd=_REPO_ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=_WORKER_TIMEOUT_S)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out_path)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fused_experts_match_the_per_expert_loop(case, fused_results):
    result = fused_results[case.name]
    i = result["inputs"]
    experts = Experts(case.experts, case.hidden, case.intermediate).to(case.dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(i["gate_up_proj"])
        experts.down_proj.copy_(i["down_proj"])
        want = experts.loop(i["x"], i["expert_ids"], i["weights"])
    got = result["out"]
    assert got.dtype == want.dtype and got.shape == want.shape
    if case.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # h and a are rounded to bf16 in both; sums in another order: within a few ulps
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        assert (got.float() - want.float()).abs().mean() < 2e-3


def test_pairs_are_grouped_by_expert_in_padded_blocks():
    # 3 tokens x 2 slots; pair p = t*2 + s. Expert 0: pairs 1, 4; expert 2: 0, 2, 5; expert 3: 3.
    expert_ids = torch.tensor([[2, 0], [2, 3], [0, 2]])
    sorted_pairs, block_expert = fused_moe.align_pairs(expert_ids, num_experts=4, block_m=4)
    pad = 6  # P
    # rows: 6 pairs + 4 experts x 3 pad rows = 18 -> 20 (whole blocks)
    assert sorted_pairs.tolist() == [1, 4, pad, pad,  # expert 0
                                     0, 2, 5, pad,    # expert 2 (expert 1 has no rows, no block)
                                     3, pad, pad, pad,  # expert 3
                                     pad, pad, pad, pad, pad, pad, pad, pad]
    assert block_expert.tolist() == [0, 2, 3, 4, 4]  # the last two blocks: nobody's (expert E)


def test_the_fused_path_takes_decode_sized_steps_on_cuda_only():
    x = torch.zeros(2, 8)
    assert not fused_moe.fused_moe_usable(x, 4, 8)  # CPU
    assert fused_moe.fused_moe_usable(x, 4, 8, impl="triton") == (fused_moe.triton is not None)
    assert not fused_moe.fused_moe_usable(x, 64 * 8 + 1, 8, impl="triton")  # a prompt step: the loop
    assert [fused_moe.block_rows(p, 8) for p in (2, 8 * 16, 8 * 17, 8 * 64)] == [16, 16, 32, 64]


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
