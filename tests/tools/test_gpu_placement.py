"""``tandem up --device cuda``: workers spread over the visible GPUs; those sharing one get KV
budgets from the free memory measured before any starts (given here, as no GPU is needed to plan)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from services.engine.model_config import load_model_config, parse_model_config
from tools.bench import kv_budget
from tools.demo import DEMO_MODEL_DIR
from tools.gpu_placement import place_workers

_WEIGHTS = kv_budget.weight_bytes(DEMO_MODEL_DIR)
_PER_TOKEN = 5 * 2 * 2 * 32 * 2  # the demo model in bfloat16: layers x (k, v) x kv heads x head dim x bytes
_FREE = 10 << 30
# each process: its context and libraries, and a 512-token step's activations (tools/bench/kv_budget.py)
_WORKING = kv_budget.working_bytes(load_model_config(DEMO_MODEL_DIR), 512, torch.bfloat16)


def _place(names, device="cuda", free=(_FREE,), dtype="auto"):
    return place_workers(names, device, DEMO_MODEL_DIR, dtype, 512, list(free))


def test_workers_alone_on_their_gpus_size_their_own_caches():
    assert _place(["prefill-0", "decode-0"], free=(_FREE, _FREE)) == {
        "prefill-0": ("--device", "cuda:0"), "decode-0": ("--device", "cuda:1")}


def test_workers_sharing_a_gpu_split_it_leaving_room_for_the_handoff_staging():
    left = int(0.9 * _FREE) - 2 * _WEIGHTS - 2 * _WORKING
    cap = 4 * 512 * _PER_TOKEN  # four of the prefill worker's steps
    kv = {"prefill-0": cap, "decode-0": left - 2 * cap}
    # each process may hold its weights, cache and working memory, and half of what is left
    rest = _FREE - sum(_WEIGHTS + b + _WORKING for b in kv.values())
    share = {n: _WEIGHTS + b + _WORKING + rest // 2 for n, b in kv.items()}
    assert _place(["prefill-0", "decode-0"]) == {
        n: ("--device", "cuda:0", "--kv-cache-bytes", str(kv[n]), "--device-memory-bytes", str(share[n]))
        for n in kv}
    assert sum(share.values()) <= _FREE
    # in float32 a token's KV is twice as large
    assert _place(["prefill-0", "decode-0"], dtype="float32")["prefill-0"][3] == str(2 * cap)
    # three mixed workers on two GPUs: two share cuda:0 evenly, the third is alone on cuda:1
    placed = _place(["mixed-0", "mixed-1", "mixed-2"], free=(_FREE, _FREE))
    assert placed["mixed-1"] == ("--device", "cuda:1")
    assert placed["mixed-0"] == placed["mixed-2"] == ("--device", "cuda:0", "--kv-cache-bytes", str(left // 2),
                                                      "--device-memory-bytes", str(_FREE // 2))
    # a named GPU takes every worker
    assert {a[1] for a in _place(["prefill-0", "decode-0"], "cuda:1", (_FREE, _FREE)).values()} == {"cuda:1"}


def test_bad_placements_are_clear_errors():
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        _place(["mixed-0"], free=())
    with pytest.raises(ValueError, match="--device cuda:2: only 1 CUDA device"):
        _place(["mixed-0"], "cuda:2")
    for device in ("cuda:x", "cudax", "cuda:-1"):
        with pytest.raises(ValueError, match=f"--device {device}: expected cpu, cuda or cuda:N"):
            _place(["mixed-0"], device)
    with pytest.raises(ValueError, match="do not fit cuda:0"):
        _place(["prefill-0", "decode-0"], free=(_WEIGHTS,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without a GPU")
def test_up_on_cuda_without_a_gpu_exits_2_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tools.cli", "up", "--device", "cuda", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device is visible" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "cluster.json").exists()


def test_each_process_sharing_a_gpu_is_counted_its_working_memory():
    # Llama-3-8B: a token's residual stream (4 x 4,096) and its MLP's gate/up and product
    # (3 x 14,336) in bfloat16, three times over, beside 2 GiB for the process itself
    llama3_8b = parse_model_config({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8})
    per_token = 4 * 4096 + 3 * 14336
    assert kv_budget.working_bytes(llama3_8b, 8192, torch.bfloat16) == (2 << 30) + 3 * 8192 * per_token * 2
    # what it takes comes out of the caches, not out of the 10 % left as slack
    gib = 1 << 30
    free, weights = [79 * gib], 15 * gib
    devices = {"prefill-0": "cuda:0", "decode-0": "cuda:0"}
    work = {"prefill-0": 3 * gib, "decode-0": 2 * gib}
    without = kv_budget.shared_device_budgets(devices, weights, free, {"prefill-0": 4 * gib})
    counted = kv_budget.shared_device_budgets(devices, weights, free, {"prefill-0": 4 * gib}, working=work)
    assert counted == {"prefill-0": 4 * gib, "decode-0": without["decode-0"] - 5 * gib}
    with pytest.raises(ValueError, match=r"weights \(2 x 15.0 GiB\) and working memory \(50.0 GiB\) do not fit"):
        kv_budget.shared_device_budgets(devices, weights, free, working={"prefill-0": 25 * gib, "decode-0": 25 * gib})


def test_up_puts_workers_sharing_a_gpu_under_mps_with_their_share_of_the_sms(tmp_path):
    from tools.cluster_cmd import _with_mps
    from tools.local_cluster import ClusterSpec

    spec = ClusterSpec(DEMO_MODEL_DIR, tmp_path, prefill=1, decode=1, mixed=1,
                       worker_name_args={"prefill-0": ("--device", "cuda:0", "--kv-cache-bytes", "1"),
                                         "decode-0": ("--device", "cuda:0"), "mixed-0": ("--device", "cuda:1")})
    assert _with_mps(spec, None) is spec
    mps = _with_mps(spec, "70,100")
    assert mps.mps_dir == tmp_path / "mps"
    assert set(mps.worker_name_env) == {"prefill-0", "decode-0"}  # mixed-0 is alone on its GPU
    assert mps.worker_name_env["prefill-0"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "70"
    assert mps.worker_name_env["decode-0"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    assert mps.worker_name_env["decode-0"]["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps" / "pipe")
    with pytest.raises(ValueError, match="PREFILL,DECODE with each 1-100"):
        _with_mps(spec, "70")
    alone = ClusterSpec(DEMO_MODEL_DIR, tmp_path, worker_name_args={"prefill-0": ("--device", "cuda:0"),
                                                                   "decode-0": ("--device", "cuda:1")})
    with pytest.raises(ValueError, match="for workers sharing a GPU"):
        _with_mps(alone, "70,100")
    assert "CUDA_MPS_CLIENT_PRIORITY" not in mps.worker_name_env["prefill-0"]  # the driver's default
    ranked = _with_mps(spec, "100,100", "below-normal,normal")
    assert {n: e["CUDA_MPS_CLIENT_PRIORITY"] for n, e in ranked.worker_name_env.items()} == {
        "prefill-0": "1", "decode-0": "0"}
    with pytest.raises(ValueError, match="--mps-priority must be PREFILL,DECODE with each one of normal, below-normal"):
        _with_mps(spec, "100,100", "low,normal")
    with pytest.raises(ValueError, match="--mps-priority needs --mps-sm-percent"):
        _with_mps(spec, None, "below-normal,normal")


def test_up_with_mps_on_cpu_exits_2_and_down_stops_a_recorded_daemon_quietly(tmp_path):
    from tools.local_cluster import ClusterState, stop_cluster

    done = subprocess.run([sys.executable, "-m", "tools.cli", "up", "--mps-sm-percent", "70,100",
                           "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "for workers sharing a GPU" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "cluster.json").exists()
    # a cluster recorded with an MPS daemon: down asks it to quit (here no MPS tools: nothing to do)
    ClusterState("http://127.0.0.1:1", "default", "", "", mps_dir=str(tmp_path / "mps")).save(tmp_path)
    said = []
    assert stop_cluster(tmp_path, progress=said.append)
    assert said == ["stopping the CUDA MPS daemon"] and not (tmp_path / "cluster.json").exists()
