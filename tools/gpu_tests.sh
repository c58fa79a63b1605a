#!/usr/bin/env bash
# The tests that run on a GPU, with the engine, workers and kernels on CUDA: the Triton
# kernels compiled (not interpreted), decode graphs and mixed-step pieces captured, KV handed
# over UCX between GPU workers, and greedy output checked against transformers and against the
# in-process engine. Needs a CUDA build of torch and a visible GPU (TANDEM_TEST_DEVICE picks
# it: cuda, cuda:1, ...). The interpreter runs of the kernels are left out (-k "not interpreter");
# extra arguments go to pytest, e.g. -x, or -k gemma (which replaces that -k).
#
#     bash tools/gpu_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export TANDEM_TEST_DEVICE=${TANDEM_TEST_DEVICE:-cuda}
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_tests: no CUDA device visible to torch')"
exec python3 -m pytest -q -k "not interpreter" "$@" \
  tests/engine/test_hf_equivalence.py tests/engine/test_attention.py tests/engine/test_paged_decode.py \
  tests/engine/test_fused_ops.py tests/engine/test_fused_moe.py tests/engine/test_packed_prefill.py \
  tests/engine/test_decode_graphs.py tests/kvstore/test_memory_tier.py \
  tests/engine/test_mixed_graphs.py tests/engine/test_overlap.py tests/engine/test_host_sync.py \
  tests/engine/test_scheduling_equivalence.py tests/kvstore/test_store.py tests/services/test_decode_worker.py \
  tests/integration/test_disaggregated.py tests/integration/test_backpressure.py tests/integration/test_slo_routing.py
