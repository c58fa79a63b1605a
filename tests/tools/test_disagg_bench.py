"""``tandem bench disagg``: layouts, arguments and the SLO sensitivity exactly, then one real
cut-down run of every layout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from tools.bench import disagg_bench, disagg_report, kv_budget
from tools.bench.disagg_bench import (LAYOUTS, PRESETS, Harness, OtherLimits, cluster_spec, fit_kv, plan_layout,
                                     resolve_preset, settings)
from tools.bench.disagg_report import compare, format_table, sensitivity_slos, slo_sensitivity, write_report
from tools.bench.mps import MpsDaemon
from tools.bench.slo import SLO, RequestRecord, goodput, summarize

MIB = 1 << 20
GPU_RESULT = disagg_bench.RESULTS_DIR / "disagg_gpu-llama3-8b_nvidia-h200.json"


# -- layouts ---------------------------------------------------------------------------------


def test_two_gpus_give_each_worker_its_own_gpu_and_the_whole_budget():
    co = plan_layout("colocated", "cuda", 2, 1024 * MIB)
    dis = plan_layout("disaggregated", "cuda", 8, 1024 * MIB)
    assert co.devices == {"mixed-0": "cuda:0", "mixed-1": "cuda:1"}
    assert dis.devices == {"prefill-0": "cuda:0", "decode-0": "cuda:1"}
    assert co.kv_cache_bytes == {"mixed-0": 1024 * MIB, "mixed-1": 1024 * MIB}
    assert dis.kv_cache_bytes == {"prefill-0": 1024 * MIB, "decode-0": 1024 * MIB}
    assert co.to_json()["shared_device"] is False and dis.to_json()["gpus_visible"] == 8


def test_one_gpu_or_cpu_is_shared_with_half_the_budget_each():
    co = plan_layout("colocated", "cuda", 1, 1001)
    assert co.devices == {"mixed-0": "cuda:0", "mixed-1": "cuda:0"}
    assert co.kv_cache_bytes == {"mixed-0": 500, "mixed-1": 500}
    dis = plan_layout("disaggregated", "cpu", 0, 256 * MIB)
    assert dis.devices == {"prefill-0": "cpu", "decode-0": "cpu"}
    assert dis.kv_cache_bytes == {"prefill-0": 128 * MIB, "decode-0": 128 * MIB}
    assert dis.to_json() == {"name": "disaggregated", "gpus_visible": 0, "shared_device": True,
                             "router_policy": "least-loaded", "workers": {
        "prefill-0": {"role": "prefill", "device": "cpu", "kv_cache_bytes": 128 * MIB},
        "decode-0": {"role": "decode", "device": "cpu", "kv_cache_bytes": 128 * MIB}}}


def test_more_workers_pick_their_prefill_share_and_wrap_around_the_gpus():
    dis = plan_layout("disaggregated", "cuda", 4, 1000, workers=4, prefill_workers=3)
    assert dis.devices == {"prefill-0": "cuda:0", "prefill-1": "cuda:1", "prefill-2": "cuda:2", "decode-0": "cuda:3"}
    assert dis.count("prefill") == 3 and dis.count("decode") == 1
    co = plan_layout("colocated", "cuda", 2, 1000, workers=4)
    assert co.devices == {"mixed-0": "cuda:0", "mixed-1": "cuda:1", "mixed-2": "cuda:0", "mixed-3": "cuda:1"}
    assert set(co.kv_cache_bytes.values()) == {500}
    assert plan_layout("disaggregated", "cpu", 0, 900, workers=3).count("prefill") == 1  # default: half, rounded down
    for workers, prefill in ((1, None), (2, 2), (3, 0)):
        with pytest.raises(ValueError, match="prefill workers"):
            plan_layout("disaggregated", "cpu", 0, 10, workers=workers, prefill_workers=prefill)


def test_one_mixed_worker_takes_the_whole_device():
    co = plan_layout("colocated", "cuda", 1, 1000, workers=1)
    assert co.devices == {"mixed-0": "cuda:0"} and co.kv_cache_bytes == {"mixed-0": 1000}
    with pytest.raises(ValueError, match="need >= 1 worker"):
        plan_layout("colocated", "cuda", 1, 1000, workers=0)


def test_the_colocated_layout_may_have_its_own_worker_count():
    """--colocated-workers 1: one mixed worker against the prefill and decode processes, one run."""
    co, dis = disagg_bench.plan_layouts(PRESETS["cpu-demo"], ["colocated", "disaggregated"], 2, None, 1)
    assert co.devices == {"mixed-0": "cpu"} and dis.devices == {"prefill-0": "cpu", "decode-0": "cpu"}
    both = disagg_bench.plan_layouts(PRESETS["cpu-demo"], ["colocated", "disaggregated"], 2)
    assert [len(layout.devices) for layout in both] == [2, 2]


def test_cuda_without_a_gpu_is_an_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        plan_layout("colocated", "cuda", 0, 1024)


def test_cluster_spec_puts_each_worker_on_its_device(tmp_path):
    workers = PRESETS["gpu-llama3-8b"].workers
    spec = cluster_spec(plan_layout("colocated", "cuda", 2, workers.kv_cache_bytes_per_device), workers,
                        tmp_path / "model", tmp_path / "state")
    assert (spec.prefill, spec.decode, spec.mixed, spec.kvstore) == (0, 0, 2, False)
    assert spec.worker_args == ("--dtype", "bfloat16", "--max-batched-tokens", "2048", "--max-num-seqs", "512",
                                "--max-model-len", "8192", "--stream-interval-ms", "20")
    # each alone on its GPU: the engines size their caches from the memory left after the weights
    assert spec.worker_name_args == {"mixed-0": ("--device", "cuda:0"), "mixed-1": ("--device", "cuda:1")}
    cpu = PRESETS["cpu-demo"].workers
    spec = cluster_spec(plan_layout("disaggregated", "cpu", 0, cpu.kv_cache_bytes_per_device), cpu,
                        tmp_path / "model", tmp_path / "state")
    assert (spec.prefill, spec.decode, spec.mixed) == (1, 1, 0)
    assert spec.worker_args[-2:] == ("--torch-threads", "1")
    assert spec.worker_name_args["decode-0"] == ("--device", "cpu", "--kv-cache-bytes", str(128 * MIB))
    python_default = replace(cpu, gil_switch_interval_ms=0.0)
    spec = cluster_spec(plan_layout("colocated", "cpu", 0, 1), python_default, tmp_path, tmp_path)
    assert spec.worker_args[-2:] == ("--gil-switch-interval-ms", "0")
    paced = replace(cpu, decode_step_period_ms=25.0)
    spec = cluster_spec(plan_layout("disaggregated", "cpu", 0, 1), paced, tmp_path, tmp_path)
    assert spec.worker_name_args["decode-0"][-2:] == ("--decode-step-period-ms", "25")
    assert "--decode-step-period-ms" not in spec.worker_name_args["prefill-0"] + spec.worker_args
    # a step time target: for mixed workers, whose steps carry prompt chunks beside decodes
    targeted = replace(cpu, step_target_ms=20.0)
    spec = cluster_spec(plan_layout("colocated", "cpu", 0, 1), targeted, tmp_path, tmp_path)
    assert spec.worker_name_args["mixed-0"][-2:] == ("--step-target-ms", "20")
    spec = cluster_spec(plan_layout("disaggregated", "cpu", 0, 1), targeted, tmp_path, tmp_path)
    assert "--step-target-ms" not in spec.worker_name_args["prefill-0"] + spec.worker_name_args["decode-0"]
    assert settings(replace(PRESETS["cpu-demo"], workers=targeted), PRESETS["cpu-demo"].plans["chatbot"],
                    tmp_path, 2)["step_target_ms"] == 20
    assert "step_target_ms" not in settings(PRESETS["cpu-demo"], PRESETS["cpu-demo"].plans["chatbot"], tmp_path, 2)
    # a batch limit of their own for decode workers; the common one stays for the others
    own = replace(workers, max_num_seqs=256, decode_max_num_seqs=512)
    spec = cluster_spec(plan_layout("disaggregated", "cuda", 2, None), own, tmp_path, tmp_path)
    assert spec.worker_name_args["decode-0"] == ("--device", "cuda:1", "--max-num-seqs", "512")
    assert spec.worker_name_args["prefill-0"][-2:] != ("--max-num-seqs", "512")
    assert settings(replace(PRESETS["gpu-llama3-8b"], workers=own), PRESETS["gpu-llama3-8b"].plans["chatbot"],
                    tmp_path, 2)["decode_max_num_seqs"] == 512
    assert "decode_max_num_seqs" not in settings(PRESETS["gpu-llama3-8b"], PRESETS["gpu-llama3-8b"].plans["chatbot"],
                                                 tmp_path, 2)
    assert "decode_max_num_seqs" not in settings(PRESETS["cpu-demo"], PRESETS["cpu-demo"].plans["chatbot"], tmp_path, 2)


def test_workers_sharing_a_gpu_under_mps_get_their_roles_share_of_the_sms(tmp_path):
    workers = replace(PRESETS["gpu-llama3-8b"].workers, mps_sm_percent=(70, 40))
    mps = MpsDaemon(tmp_path / "mps")
    one_gpu = replace(plan_layout("disaggregated", "cuda", 1, None), kv_cache_bytes={"prefill-0": 1, "decode-0": 2})
    spec = cluster_spec(one_gpu, workers, tmp_path, tmp_path, mps=mps)
    dirs = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps" / "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps" / "log")}
    assert spec.worker_name_env == {"prefill-0": {**dirs, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "70"},
                                    "decode-0": {**dirs, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "40"}}
    assert spec.mps_dir == tmp_path / "mps"  # start_cluster starts the daemon, stop_cluster stops it
    mixed = cluster_spec(plan_layout("colocated", "cuda", 1, 2), workers, tmp_path, tmp_path, mps=mps)
    assert {e["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] for e in mixed.worker_name_env.values()} == {"100"}
    # each worker alone on its GPU: nothing to share, no MPS
    assert plan_layout("disaggregated", "cuda", 2, None).sharing_gpu() == []
    assert cluster_spec(plan_layout("disaggregated", "cuda", 2, None), workers, tmp_path, tmp_path).worker_name_env == {}
    assert settings(PRESETS["gpu-llama3-8b"], PRESETS["gpu-llama3-8b"].plans["chatbot"], tmp_path, 2).keys() \
        .isdisjoint({"mps_sm_percent", "decode_step_period_ms", "router_tpot_slo"})  # off: as results stored before
    on = replace(PRESETS["gpu-llama3-8b"], workers=workers)
    assert settings(on, on.plans["chatbot"], tmp_path, 2)["mps_sm_percent"] == [70, 40]
    ranked = replace(workers, mps_priority=(1, 0))
    env = cluster_spec(one_gpu, ranked, tmp_path, tmp_path, mps=mps).worker_name_env
    assert (env["prefill-0"]["CUDA_MPS_CLIENT_PRIORITY"], env["decode-0"]["CUDA_MPS_CLIENT_PRIORITY"]) == ("1", "0")
    assert "CUDA_MPS_CLIENT_PRIORITY" not in spec.worker_name_env["prefill-0"]
    ranked_preset = replace(PRESETS["gpu-llama3-8b"], workers=ranked)
    assert settings(ranked_preset, ranked_preset.plans["chatbot"], tmp_path, 2)["mps_priority"] == [1, 0]
    tpot = replace(on, harness=replace(on.harness, router_tpot_slo=True))
    assert settings(tpot, tpot.plans["chatbot"], tmp_path, 2)["router_tpot_slo"] is True


def test_mps_without_its_control_program_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvidia-cuda-mps-control not found on PATH"):
        MpsDaemon(tmp_path / "mps").start()
    MpsDaemon(tmp_path / "mps").stop()  # never started: nothing to stop


def test_mps_control_daemon_is_started_and_asked_to_quit_with_its_directories(tmp_path, monkeypatch):
    """A stand-in control program on PATH records how it was called (the real one needs a GPU)."""
    record = tmp_path / "calls"
    fake = tmp_path / "nvidia-cuda-mps-control"
    fake.write_text(f'#!/bin/sh\necho "$* $CUDA_MPS_PIPE_DIRECTORY $(cat)" >> {record}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    daemon = MpsDaemon(tmp_path / "mps")
    daemon.start()
    MpsDaemon(tmp_path / "mps").stop()  # as `tandem down` does: another object, the same directory
    MpsDaemon(tmp_path / "other").stop()  # none started there: nothing to ask
    pipe = tmp_path / "mps" / "pipe"
    assert pipe.is_dir() and (tmp_path / "mps" / "log").is_dir()
    assert record.read_text().splitlines() == [f"-d {pipe} ", f" {pipe} quit"]
    fake.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    with pytest.raises(RuntimeError, match="exit 3.*cannot start"):
        MpsDaemon(tmp_path / "mps2").start()


def test_stop_waits_until_the_daemons_processes_are_gone(tmp_path, monkeypatch):
    """The real daemon quits in the background (its server last): stop() returns once no process
    named nvidia-cuda-mps-* with this pipe directory in its environment is left. Stand-ins: a
    control program that starts a "server" and, asked to quit, ends it 0.3 s later."""
    server = tmp_path / "nvidia-cuda-mps-server"
    server.write_text("#!/bin/sh\nwhile :; do sleep 0.05; done\n")
    fake = tmp_path / "nvidia-cuda-mps-control"
    pid_file = tmp_path / "server.pid"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -d ]; then {server} >/dev/null 2>&1 & echo $! > {pid_file}; exit 0; fi\n'
                    f'cat >/dev/null; (sleep 0.3; kill $(cat {pid_file})) >/dev/null 2>&1 &\n')
    for program in (server, fake):
        program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    daemon = MpsDaemon(tmp_path / "mps")
    daemon.start()
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while daemon.processes() != [pid]:  # the stand-in server, found by its name and environment
        assert time.monotonic() < deadline, daemon.processes()
        time.sleep(0.05)
    assert MpsDaemon(tmp_path / "other").processes() == []
    daemon.stop()
    assert daemon.processes() == []


def test_gpu_workers_sharing_a_device_split_what_is_free_after_their_weights(tmp_path, monkeypatch):
    # the working memory each process is counted is set aside here (tests/tools/test_gpu_placement.py)
    monkeypatch.setattr(kv_budget, "PROCESS_BYTES", 0)
    monkeypatch.setattr(kv_budget, "ACTIVATION_SAFETY", 0)
    (tmp_path / "model.safetensors").write_bytes(b"w" * 1000)
    # 2 layers x (k, v) x 1 kv head x 8 dims x 2 bytes = 64 bytes a token in bfloat16
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 2, "intermediate_size": 32, "vocab_size": 64}))
    assert kv_budget.weight_bytes(tmp_path) == 1000  # config.json is not weights
    gpu = PRESETS["gpu-llama3-8b"].workers
    small = replace(gpu, max_batched_tokens=2, prefill_max_batched_tokens=3)  # a prefill cap of 4 x 3 x 64 = 768
    alone = plan_layout("disaggregated", "cuda", 2, None)
    assert fit_kv(alone, tmp_path, gpu, free_bytes=lambda: pytest.fail("alone: nothing to measure")) == alone
    assert cluster_spec(alone, gpu, tmp_path, tmp_path).worker_name_args == {
        "prefill-0": ("--device", "cuda:0", "--max-batched-tokens", "8192"),
        "decode-0": ("--device", "cuda:1")}
    shared = fit_kv(plan_layout("colocated", "cuda", 1, None), tmp_path, small, free_bytes=lambda: [10_000])
    assert shared.kv_cache_bytes == {"mixed-0": (9000 - 2000) // 2, "mixed-1": (9000 - 2000) // 2}
    # prefill and decode on one GPU: the prefill worker holds a few steps of prompts, as much again is
    # left for the decode worker's handoff staging, the decode worker's cache gets the rest
    pd = fit_kv(plan_layout("disaggregated", "cuda", 1, None), tmp_path, small, free_bytes=lambda: [10_000])
    assert pd.kv_cache_bytes == {"prefill-0": 768, "decode-0": 7000 - 2 * 768}
    # each capped at its weights and cache and half of the rest of the free memory
    rest = 10_000 - (1000 + 768) - (1000 + 7000 - 2 * 768)
    assert pd.device_memory_bytes == {"prefill-0": 1768 + rest // 2, "decode-0": 8000 - 2 * 768 + rest // 2}
    args = cluster_spec(pd, small, tmp_path, tmp_path).worker_name_args
    assert args["decode-0"][:6] == ("--device", "cuda:0", "--kv-cache-bytes", str(7000 - 2 * 768),
                                    "--device-memory-bytes", str(8000 - 2 * 768 + rest // 2))
    assert pd.to_json()["workers"]["prefill-0"]["device_memory_bytes"] == 1768 + rest // 2
    tight = fit_kv(plan_layout("disaggregated", "cuda", 1, None), tmp_path, small, free_bytes=lambda: [3000])
    assert tight.kv_cache_bytes == {"prefill-0": 233, "decode-0": 700 - 2 * 233}  # no more than an even share
    # three workers on two GPUs: the two on cuda:0 share it, the one on cuda:1 sizes its own cache
    three = fit_kv(plan_layout("disaggregated", "cuda", 2, None, workers=3, prefill_workers=1), tmp_path, small,
                   free_bytes=lambda: [5000, 1])
    assert three.kv_cache_bytes == {"prefill-0": 768, "decode-0": None, "decode-1": 2500 - 2 * 768}
    with pytest.raises(ValueError, match=r"do not fit cuda:0 .*--kv-cache-bytes"):
        fit_kv(plan_layout("colocated", "cuda", 1, None), tmp_path, small, free_bytes=lambda: [2000])
    given = plan_layout("colocated", "cuda", 1, 4000)  # a budget on the command line is kept
    assert fit_kv(given, tmp_path, small, free_bytes=lambda: [1]).kv_cache_bytes == {"mixed-0": 2000, "mixed-1": 2000}


def test_free_device_memory_is_read_in_a_child_process():
    free = kv_budget.free_device_bytes()
    assert len(free) == torch.cuda.device_count() and all(f > 0 for f in free)


def test_the_slo_layout_is_disaggregated_with_the_slo_aware_router_at_the_workloads_ttft(tmp_path):
    cpu = PRESETS["cpu-demo"].workers
    layout = plan_layout("disaggregated-slo", "cpu", 0, cpu.kv_cache_bytes_per_device)
    assert layout.devices == plan_layout("disaggregated", "cpu", 0, 1).devices
    assert (layout.policy, layout.to_json()["router_policy"]) == ("slo-aware", "slo-aware")
    spec = cluster_spec(layout, cpu, tmp_path / "model", tmp_path / "state", ttft_slo_ms=1500.0)
    assert (spec.policy, spec.router_args) == ("slo-aware", ("--ttft-slo-ms", "1500"))
    plain = cluster_spec(plan_layout("disaggregated", "cpu", 0, 1), cpu, tmp_path, tmp_path, ttft_slo_ms=1500.0)
    assert (plain.policy, plain.router_args) == ("least-loaded", ())
    with pytest.raises(ValueError, match="TTFT SLO"):
        cluster_spec(layout, cpu, tmp_path / "model", tmp_path / "state")
    # the workload's TPOT limit too, only where asked
    spec = cluster_spec(layout, cpu, tmp_path, tmp_path, ttft_slo_ms=1500.0, tpot_slo_ms=100.0)
    assert spec.router_args == ("--ttft-slo-ms", "1500")
    tpot = Harness(router_tpot_slo=True)
    spec = cluster_spec(layout, cpu, tmp_path, tmp_path, ttft_slo_ms=1500.0, harness=tpot, tpot_slo_ms=100.0)
    assert spec.router_args == ("--ttft-slo-ms", "1500", "--tpot-slo-ms", "100")
    plain = cluster_spec(plan_layout("disaggregated", "cpu", 0, 1), cpu, tmp_path, tmp_path, ttft_slo_ms=1500.0,
                         harness=tpot, tpot_slo_ms=100.0)
    assert plain.router_args == ()
    with pytest.raises(ValueError, match="TPOT SLO"):
        cluster_spec(layout, cpu, tmp_path, tmp_path, ttft_slo_ms=1500.0, harness=tpot)


def test_compare_gives_each_disaggregated_layout_its_ratio():
    co, dis, slo = (_entry([(1, 1.0), (2, 0.95), (4, 0.5)], 2), _entry([(1, 1.0), (2, 0.5)], 1),
                    _entry([(1, 1.0), (2, 1.0), (4, 0.95), (8, 0.1)], 4))
    both = compare({"colocated": co, "disaggregated": dis, "disaggregated-slo": slo})
    assert both["ratios"] == {"disaggregated": 0.5, "disaggregated-slo": 2.0} and both["ratio"] == 0.5
    assert both["goodput"] == {"colocated": 2, "disaggregated": 1, "disaggregated-slo": 4}
    only_slo = compare({"colocated": co, "disaggregated-slo": slo})
    assert (only_slo["ratio"], only_slo["ratios"]) == (None, {"disaggregated-slo": 2.0})
    lines = format_table({"workloads": {"w": {"layouts": {}, "comparison": both}}}, []).splitlines()
    assert disagg_report._comparison_lines(both)[:2] == ["  disaggregated / colocated goodput: 0.50",
                                                          "  disaggregated-slo / colocated goodput: 2.00"]
    assert lines[-1].startswith("goodput:")


def test_cluster_spec_rejects_args_for_a_worker_it_does_not_have(tmp_path):
    from tools.local_cluster import ClusterSpec

    with pytest.raises(ValueError, match="mixed-1"):
        ClusterSpec(tmp_path, tmp_path, prefill=1, decode=1, worker_name_args={"mixed-1": ("--device", "cuda:1")})


def test_a_random_checkpoint_is_written_once(tmp_path, monkeypatch):
    from tools.bench.random_models import TINY_LLAMA

    monkeypatch.setitem(disagg_bench.RANDOM_SHAPES, "llama3-1b", TINY_LLAMA)  # the same path, at toy size
    preset = replace(PRESETS["gpu-llama3-1b"], workers=replace(PRESETS["gpu-llama3-1b"].workers, dtype="float32"))
    model_dir = disagg_bench.prepare_model(preset, tmp_path)
    assert model_dir == tmp_path / "llama3-1b"
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (128, 2, 2048)
    written = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert disagg_bench.prepare_model(preset, tmp_path) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == written
    assert disagg_bench.prepare_model(PRESETS["cpu-demo"], tmp_path) == PRESETS["cpu-demo"].model_dir


def test_flags_override_the_preset():
    args = disagg_bench.build_parser().parse_args([
        "--preset", "gpu-llama3-8b", "--workloads", "summarization", "--rates", "0.5,1", "--duration", "7",
        "--tpot-slo-ms", "80", "--kv-cache-bytes", "1000", "--max-num-seqs", "16", "--random-shape", "llama3-1b",
        "--stream-interval-ms", "50", "--decode-max-num-seqs", "384", "--mps-sm-percent", "100,100",
        "--mps-priority", "below-normal, normal"])
    preset = resolve_preset(args)
    assert (preset.workers.decode_max_num_seqs, preset.workers.mps_sm_percent, preset.workers.mps_priority) == (
        384, (100, 100), (1, 0))
    assert preset.workloads == ("summarization",) and preset.random_shape == "llama3-1b"
    assert preset.plans["summarization"].rates == (0.5, 1.0)
    assert preset.plans["summarization"].slo == SLO(ttft_ms=3000, tpot_ms=80)
    assert (preset.duration_s, preset.workers.kv_cache_bytes_per_device, preset.workers.max_num_seqs) == (7, 1000, 16)
    assert preset.workers.max_batched_tokens == 2048  # not given: the preset's
    assert preset.workers.stream_interval_ms == 50
    assert preset.other_limits == OtherLimits(tpot_ms=(30, 25, 20, 15))  # the GPU presets'


def test_the_router_and_load_generator_sizes_reach_the_cluster_and_the_sweep(tmp_path):
    assert PRESETS["cpu-demo"].harness == Harness()  # one of each on a 2-core machine
    gpu = resolve_preset(disagg_bench.build_parser().parse_args(["--preset", "gpu-llama3-8b", "--connections", "3"]))
    assert gpu.harness == Harness(router_processes=2, client_processes=2, connections=3)
    spec = cluster_spec(plan_layout("colocated", "cuda", 2, None), gpu.workers, tmp_path, tmp_path,
                        harness=gpu.harness)
    assert spec.router_processes == 2
    plan = gpu.plans["chatbot"]
    args = disagg_bench.serve_args("grpc://127.0.0.1:1", tmp_path, plan, gpu)
    assert (args.client_processes, args.connections) == (2, 3)
    settings = disagg_bench.settings(gpu, plan, tmp_path, 2)
    assert (settings["router_processes"], settings["client_processes"], settings["connections"]) == (2, 2, 3)
    with pytest.raises(SystemExit) as e:
        disagg_bench.main(["--preset", "cpu-demo", "--router-processes", "0"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv,other", [
    (["--preset", "cpu-demo"], OtherLimits()),
    (["--preset", "gpu-llama3-1b", "--also-ttft-ms", "250"], OtherLimits(tpot_ms=(30, 25, 20, 15), ttft_ms=(250,))),
    (["--preset", "gpu-llama3-8b", "--also-tpot-ms", "20,12.5"], OtherLimits(tpot_ms=(20, 12.5))),
    (["--preset", "gpu-llama3-8b", "--also-tpot-ms", "none"], OtherLimits()),
])
def test_other_limits_default_to_the_presets(argv, other):
    assert resolve_preset(disagg_bench.build_parser().parse_args(argv)).other_limits == other


@pytest.mark.parametrize("argv,message", [
    (["--workloads", "chat"], "unknown workload(s) chat"),
    (["--layouts", "colocated,split"], "unknown layout 'split'"),
    (["--rates", "1,x"], "--rates must be comma-separated numbers"),
    (["--rates", "1,2,1"], "--rates must differ"),
    (["--duration", "0"], "must be > 0"),
    (["--also-tpot-ms", "20,x"], "--also-tpot-ms must be comma-separated milliseconds, got '20,x'"),
    (["--also-ttft-ms", "0"], "--also-ttft-ms must be > 0"),
    (["--stream-interval-ms", "-1"], "--stream-interval-ms and --decode-step-period-ms must be >= 0"),
    (["--decode-step-period-ms", "-1"], "--stream-interval-ms and --decode-step-period-ms must be >= 0"),
    (["--step-target-ms", "0"], "--step-target-ms must be > 0"),
    (["--colocated-max-batched-tokens", "512,0"], "--colocated-max-batched-tokens must be > 0"),
    (["--colocated-step-target-ms", "x"], "--colocated-step-target-ms must be comma-separated numbers"),
    (["--mps-sm-percent", "70"], "--mps-sm-percent must be PREFILL,DECODE with each 1-100, got '70'"),
    (["--mps-sm-percent", "70,0"], "--mps-sm-percent must be PREFILL,DECODE"),
    (["--mps-sm-percent", "70,x", "--device", "cuda"], "--mps-sm-percent must be PREFILL,DECODE"),
    (["--mps-sm-percent", "70,40"], "--mps-sm-percent needs --device cuda"),
    (["--mps-priority", "below-normal,normal", "--device", "cuda"], "--mps-priority needs --mps-sm-percent"),
    (["--mps-sm-percent", "100,100", "--mps-priority", "below-normal", "--device", "cuda"],
     "--mps-priority must be PREFILL,DECODE"),
    (["--colocated-workers", "0"], "need >= 1 worker"),
])
def test_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        disagg_bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_tandem_bench_disagg_runs_this_benchmark():
    done = subprocess.run([sys.executable, "-m", "tools.cli", "bench", "disagg", "--layouts", "split"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "tandem bench disagg: error: unknown layout 'split'" in done.stderr


def test_the_estimate_counts_every_cluster_and_rate():
    preset = PRESETS["gpu-llama3-8b"]  # 8 + 6 rates; 2 layouts; 30 s starts, 10 s rates, 20 s drains
    typical, worst = disagg_bench.estimate_s(preset, 2)
    assert typical == 4 * (30 + 5) + 28 * (10 + 3)
    assert worst == 4 * (30 + 5) + 28 * (10 + 20)


def _entry(rates_attained: list[tuple[float, float]], good: float | None, seed: int = 0,
           devices: tuple[str, ...] = ("cuda:0", "cuda:1"), **shape) -> dict:
    """A layout's entry with its workers on ``devices``; ``shape``: settings of how it runs (workers, MPS)."""
    return {"settings": {"seed": seed, **shape}, "goodput_rate": good,
            "layout": {"workers": {f"w-{i}": {"device": d} for i, d in enumerate(devices)}},
            "runs": [{"rate": r, "summary": {"slo_attainment": a}} for r, a in rates_attained]}


def test_compare_gives_a_ratio_only_for_the_same_settings():
    co, dis = _entry([(1, 1.0), (2, 0.95), (4, 0.5)], 2), _entry([(1, 1.0), (2, 1.0), (4, 0.92)], 4)
    assert compare({"colocated": co}) is None
    both = compare({"colocated": co, "disaggregated": dis})
    assert (both["ratio"], both["same_settings"]) == (2.0, True)
    assert both["notes"] == ["disaggregated met the SLO at its highest rate: its goodput is at least 4/s"]
    other = compare({"colocated": co, "disaggregated": _entry([(1, 1.0)], 1, seed=1)})
    assert other["ratio"] is None and "different settings" in other["notes"][0]
    more_gpus = compare({"colocated": co, "disaggregated": _entry([(1, 1.0)], 1, devices=("cuda:0", "cuda:1", "cuda:2"))})
    assert more_gpus["ratio"] is None and "other GPU counts" in more_gpus["notes"][0]
    none = compare({"colocated": _entry([(1, 0.2)], None), "disaggregated": dis})
    assert none["ratio"] is None and none["notes"][0] == "colocated met the SLO at no swept rate (sweep lower rates)"


def test_one_mixed_worker_compares_with_two_processes_sharing_its_gpu():
    """On one GPU the baseline is one mixed worker (``--workers 1``), the disaggregated layout two
    processes, perhaps under MPS: the same requests on as many GPUs, so their goodputs divide."""
    one = _entry([(1, 1.0), (2, 0.5)], 1, devices=("cuda:0",), workers=1)
    shared = _entry([(1, 1.0), (2, 0.95)], 2, devices=("cuda:0", "cuda:0"), workers=2, mps_sm_percent=[70, 100])
    slo = _entry([(1, 1.0), (2, 0.95)], 2, devices=("cuda:0", "cuda:0"), workers=2, router_tpot_slo=True)
    both = compare({"colocated": one, "disaggregated": shared, "disaggregated-slo": slo})
    assert both["ratios"] == {"disaggregated": 2.0, "disaggregated-slo": 2.0} and both["same_settings"]
    other_seed = compare({"colocated": one, "disaggregated": _entry([(1, 1.0)], 1, seed=1, devices=("cuda:0", "cuda:0"))})
    assert other_seed["ratio"] is None


def test_sweeps_over_other_rates_and_batch_limits_compare():
    """A rate and seed send the same requests whatever else was swept; a decode worker may batch
    more sequences than a mixed one. Only a goodput that is a bound is noted."""
    co = _entry([(2, 1.0), (3, 0.95), (4, 0.5)], 3, devices=("cuda:0",), workers=1, rates=[2, 3, 4], max_num_seqs=256)
    dis = _entry([(4, 1.0), (6, 0.9), (8, 0.4)], 6, devices=("cuda:0", "cuda:0"), workers=2, rates=[4, 6, 8],
                 max_num_seqs=512)
    both = compare({"colocated": co, "disaggregated": dis})
    assert (both["ratio"], both["same_settings"], both["notes"]) == (2.0, True, [])
    low = _entry([(4, 0.5), (6, 0.2)], None, devices=("cuda:0", "cuda:0"), workers=2, rates=[4, 6])
    assert compare({"colocated": co, "disaggregated": low})["notes"] == [
        "disaggregated met the SLO at no swept rate (sweep lower rates)"]
    small_chunks = _entry([(2, 1.0), (3, 0.5)], 2, devices=("cuda:0",), workers=1, rates=[2, 3], max_batched_tokens=512)
    assert compare({"colocated": small_chunks, "disaggregated": dis})["ratio"] == 3.0  # a chunk size is how it runs
    longer = _entry([(4, 1.0)], 4, devices=("cuda:0", "cuda:0"), workers=2, rates=[4], duration_s=20)
    assert compare({"colocated": co, "disaggregated": longer})["ratio"] is None  # other requests


# -- SLO sensitivity: recomputed from the stored records ---------------------------------------

_SLO = SLO(ttft_ms=500, tpot_ms=50)
_RATES = (4, 8, 16)


def _records(rate: float, ttft_ms: float, tpot_ms: float, n: int = 10) -> list[dict]:
    """n requests with the same latencies, but the first has a one-token output (no TPOT)."""
    return [{"index": i, "scheduled_s": i / rate, "sent_s": i / rate, "input_len": 100, "output_len_requested": 20,
             "output_len": 1 if i == 0 else 20, "ttft_ms": ttft_ms, "tpot_ms": None if i == 0 else tpot_ms,
             "e2e_ms": ttft_ms + 19 * tpot_ms, "ok": True, "error": None} for i in range(n)]


def _layout_entry(name: str, latencies: list[tuple[float, float]]) -> dict:
    """A layout's entry as run_layout stores it; latencies: (TTFT, TPOT) per rate of _RATES."""
    runs = []
    for rate, (ttft, tpot) in zip(_RATES, latencies):
        records = _records(rate, ttft, tpot)
        runs.append({"rate": rate, "seed": 0, "requests": records,
                     "summary": summarize([RequestRecord(**r) for r in records], _SLO)})
    settings = {"slo": {"ttft_ms": _SLO.ttft_ms, "tpot_ms": _SLO.tpot_ms}, "rates": list(_RATES), "seed": 0,
                "duration_s": 10, "device": "cpu", "dtype": "float32"}
    return {"layout": plan_layout(name, "cpu", 0, MIB).to_json(), "settings": settings, "runs": runs,
            "goodput_rate": goodput([(run["rate"], run["summary"]["slo_attainment"]) for run in runs])}


def _layouts() -> dict[str, dict]:
    """Colocated: TTFT fine, TPOT 3 ms x rate (12, 24, 48 ms). Disaggregated: TPOT a flat 6 ms,
    TTFT over the 500 ms limit at 16 req/s. Goodput at TPOT <= 50 ms: 16 vs 8."""
    return {"colocated": _layout_entry("colocated", [(100, 12), (100, 24), (100, 48)]),
            "disaggregated": _layout_entry("disaggregated", [(150, 6), (300, 6), (900, 6)])}


def test_the_table_counts_requests_cut_at_the_drain_deadline_and_those_within_the_limits():
    layouts = _layouts()
    runs = layouts["disaggregated"]["runs"]
    cut = {"ok": False, "error": "timeout: still running 12 s after the send window closed", "e2e_ms": None}
    runs[0]["requests"][1].update(cut)  # TTFT 150, TPOT 6 so far: within both
    runs[2]["requests"][2].update(cut)  # TTFT 900: a miss anyway
    runs[2]["requests"][3].update(cut, ttft_ms=None, tpot_ms=None)  # no token yet
    runs[1]["requests"][4].update(ok=False, error="client error: reset")  # not a cut
    slot = {"layouts": layouts, "comparison": compare(layouts)}
    lines = format_table({"workloads": {"chatbot": slot}}, ["chatbot"]).splitlines()
    assert "  still running at the drain deadline, counted as misses: disaggregated 3 (1 within both limits so far)" \
        in lines
    assert not any("TPOT after the first gap" in line for line in lines)  # no record has a first gap
    assert not any("drain deadline" in line for line in
                   format_table({"workloads": {"chatbot": {"layouts": _layouts(), "comparison": slot["comparison"]}}},
                                ["chatbot"]).splitlines())


def table_lines(layouts: dict[str, dict]) -> list[str]:
    """The chatbot table of ``layouts`` compared, line by line."""
    return format_table({"workloads": {"chatbot": {"layouts": layouts, "comparison": compare(layouts)}}},
                        ["chatbot"]).splitlines()


def test_the_table_gives_the_decode_pace_after_the_first_gap():
    layouts = _layouts()
    for entry, gap in ((layouts["colocated"], 0), (layouts["disaggregated"], 36)):
        for run in entry["runs"]:
            for r in run["requests"]:
                r.update(first_gap_ms=gap, e2e_ms=r["e2e_ms"] + gap)  # 20 tokens: 18 after the gap
    lines = table_lines(layouts)
    assert ("  TPOT after the first gap, p50 ms at rate: colocated 4: 12.7, 8: 25.3, 16: 50.7; "
            "disaggregated 4: 6.3, 8: 6.3, 16: 6.3") in lines
    # 10 requests 1/rate s apart, each lasting TTFT + 19 TPOT (+ the gap): at 8 req/s 0.125 s apart,
    # 0.556 s long (colocated: 5 at once) or 0.45 s (disaggregated: 4); at 16 req/s all 10 overlap
    assert ("  requests in flight at most, at rate: colocated 4: 2, 8: 5, 16: 10; "
            "disaggregated 4: 2, 8: 4, 16: 10") in lines


def test_the_comparison_notes_a_batch_limit_that_held_requests_back_where_a_layout_first_missed():
    layouts = _layouts()  # disaggregated: goodput 8, first missed at 16 req/s
    dis = layouts["disaggregated"]
    dis["settings"]["decode_max_num_seqs"] = 512
    dis["runs"][1]["workers"] = {"decode-0": {"full_batch": 0.5}}  # at its goodput: no matter
    dis["runs"][2]["workers"] = {"decode-0": {"full_batch": 0.04}}
    assert not any("batch" in note for note in compare(layouts)["notes"])
    dis["runs"][2]["workers"] = {"decode-0": {"full_batch": 0.12}, "prefill-0": {"full_batch": None}}
    assert [note for note in compare(layouts)["notes"] if "batch" in note] == [
        "disaggregated at 16/s, the first rate it missed: a batch was full while requests waited (decode-0 in 12% of "
        "its steps, decode_max_num_seqs 512); a higher batch limit may raise its goodput"]


def test_a_tight_tpot_limit_flips_the_ratio():
    layouts = _layouts()
    assert compare(layouts)["ratio"] == 0.5  # the headline: TPOT <= 50 ms
    loose, tight = slo_sensitivity(layouts, [SLO(500, 30), SLO(500, 20)])
    assert loose == {"ttft_ms": 500, "tpot_ms": 30, "goodput": {"colocated": 8, "disaggregated": 8}, "ratio": 1.0,
                     "ratios": {"disaggregated": 1.0}, "attainment": {"colocated": [[4, 1.0], [8, 1.0], [16, 0.1]],
                                    "disaggregated": [[4, 1.0], [8, 1.0], [16, 0.0]]}}
    # at 8 req/s only the one-token request (no TPOT) meets TPOT <= 20 ms
    assert tight == {"ttft_ms": 500, "tpot_ms": 20, "goodput": {"colocated": 4, "disaggregated": 8}, "ratio": 2.0,
                     "ratios": {"disaggregated": 2.0}, "attainment": {"colocated": [[4, 1.0], [8, 0.1], [16, 0.1]],
                                    "disaggregated": [[4, 1.0], [8, 1.0], [16, 0.0]]}}


def test_the_own_slo_recomputed_gives_the_headline_of_the_committed_gpu_run():
    report = json.loads(GPU_RESULT.read_text())
    for slot in report["workloads"].values():
        [item] = slo_sensitivity(slot["layouts"], [disagg_report.primary_slo(slot)])
        for name, entry in slot["layouts"].items():
            assert item["goodput"][name] == entry["goodput_rate"]
            headline = [[run["rate"], run["summary"]["slo_attainment"]] for run in entry["runs"]]
            assert item["attainment"][name] == headline
        assert item["ratio"] == slot["comparison"]["ratio"]


def test_the_limits_are_the_asked_and_the_stored_ones_loosest_first_without_the_own():
    slot = {"layouts": _layouts(), "slo_sensitivity": [{"ttft_ms": 500, "tpot_ms": 20}]}
    assert sensitivity_slos(slot, OtherLimits(tpot_ms=(15, 50, 25.0), ttft_ms=(250,))) == [
        SLO(500, 25), SLO(500, 20), SLO(500, 15), SLO(250, 50)]


def test_runs_without_records_are_reported_not_a_crash(tmp_path):
    layouts = _layouts()
    for run in layouts["colocated"]["runs"]:
        del run["requests"]
    [item] = slo_sensitivity(layouts, [SLO(500, 20)])
    assert (item["goodput"], item["ratio"], item["no_records"]) == ({"colocated": None, "disaggregated": 8}, None,
                                                                    ["colocated"])
    slot = {"layouts": layouts, "comparison": compare(layouts), "slo_sensitivity": [item]}
    assert "    TPOT <= 20 ms: colocated no per-request records, disaggregated 8 req/s (-)" in \
        format_table({"workloads": {"chatbot": slot}}, ["chatbot"]).splitlines()
    write_report(tmp_path / "r.json", {"workloads": {"chatbot": slot}})  # runs without records are written as they are
    assert "requests" not in json.loads((tmp_path / "r.json").read_text())["workloads"]["chatbot"]["layouts"][
        "colocated"]["runs"][0]


def _no_cluster(*args, **kwargs):
    raise AssertionError("--report-only started something")


def test_report_only_prints_the_sensitivity_and_adds_it_once(tmp_path, monkeypatch, capsys):
    for name in ("start_cluster", "run_layout", "prepare_model"):
        monkeypatch.setattr(disagg_bench, name, _no_cluster)
    path = tmp_path / "disagg_cpu-demo_x.json"
    layouts = _layouts()
    stored = {"benchmark": "disagg", "preset": "cpu-demo", "attainment_threshold": 0.9, "machine": {},
              "workloads": {"chatbot": {"layouts": layouts, "comparison": compare(layouts)}}}
    write_report(path, stored)
    argv = ["--report-only", "--results-file", str(path), "--also-tpot-ms", "30,20"]
    assert disagg_bench.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    block = out.index("  other SLO limits, recomputed from the same requests and rates "
                      "(the SLO above stays the headline):")
    assert out[block - 2] == "  disaggregated / colocated goodput: 0.50"
    assert out[block + 1:block + 3] == ["    TPOT <= 30 ms: colocated 8, disaggregated 8 req/s (1.00x)",
                                        "    TPOT <= 20 ms: colocated 4, disaggregated 8 req/s (2.00x)"]
    report = json.loads(path.read_text())
    slot = report["workloads"]["chatbot"]
    assert [(i["tpot_ms"], i["ratio"]) for i in slot.pop("slo_sensitivity")] == [(30, 1.0), (20, 2.0)]
    assert report == json.loads(json.dumps(stored))  # nothing else changed
    assert path.with_name(f"{path.stem}_chatbot_attainment.png").is_file()
    written = path.read_bytes()
    assert disagg_bench.main(argv + ["--no-plots"]) == 0  # the block is there now: nothing to write
    assert path.read_bytes() == written
    assert "TPOT <= 20 ms: colocated 4" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    (None, "no results file {path}"),
    ("{", "{path}: not a JSON file (Expecting property name"),
    ('{"benchmark": "serve"}', "{path}: not a tandem bench disagg result"),
])
def test_report_only_of_a_bad_file_exits_2_with_one_line(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.setattr(disagg_bench, "start_cluster", _no_cluster)
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert disagg_bench.main(["--report-only", "--results-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem bench disagg: error: " + message.format(path=path)) and err.count("\n") == 1


# -- a real run: both layouts, real clusters -------------------------------------------------


def test_cpu_run_of_every_layout(tmp_path, capsys):
    results = tmp_path / "results"
    argv = ["--preset", "cpu-demo", "--workloads", "chatbot", "--scale", "0.05", "--rates", "2,4", "--duration",
            "4", "--drain-timeout", "20", "--state-dir", str(tmp_path / "state"), "--results-dir", str(results),
            "--also-tpot-ms", "1000", "--router-processes", "2", "--client-processes", "2", "--connections", "2"]
    assert disagg_bench.main(argv) == 0  # the GPU presets' router and load generator, in processes of their own
    [path] = results.glob("disagg_cpu-demo_*.json")
    report = json.loads(path.read_text())
    slot = report["workloads"]["chatbot"]
    assert set(slot["layouts"]) == set(LAYOUTS)
    for name, entry in slot["layouts"].items():
        assert entry["layout"]["name"] == name and entry["layout"]["shared_device"]
        roles = sorted(w["role"] for w in entry["layout"]["workers"].values())
        assert roles == (["mixed", "mixed"] if name == "colocated" else ["decode", "prefill"])
        assert entry["layout"]["router_policy"] == ("slo-aware" if name == "disaggregated-slo" else "least-loaded")
        assert [run["rate"] for run in entry["runs"]] == [2, 4]
        assert (entry["settings"]["router_processes"], entry["settings"]["client_processes"]) == (2, 2)
        for run in entry["runs"]:
            assert run["cpu"]["router"] > 0 and run["cpu"]["load-generator"] > 0  # with their child processes
            s = run["summary"]
            assert s["ok"] == s["requests"] > 0 and s["failed"] == 0
            assert 0 <= s["slo_attainment"] <= 1
            assert all(r["cached_prompt_tokens"] == 0 for r in run["requests"])  # a fresh cluster per layout
            workers = run["workers"]  # every worker's engine counters over the run
            assert {w: f["role"] for w, f in workers.items()} == {
                w: spec["role"] for w, spec in entry["layout"]["workers"].items()}
            assert not any(f["missing"] for f in workers.values())
            assert max(f["steps"] for f in workers.values()) > 0
        assert "goodput_rate" in entry
        assert entry["work"]["matmul_flop_s"] > 0 and entry["work"]["model"]["linear_flops_per_token"] > 0
    co, dis = slot["layouts"]["colocated"], slot["layouts"]["disaggregated"]
    assert co["settings"] == dis["settings"] == slot["layouts"]["disaggregated-slo"]["settings"]
    assert [[r["input_len"] for r in run["requests"]] for run in co["runs"]] == \
        [[r["input_len"] for r in run["requests"]] for run in dis["runs"]]  # the same requests
    comparison = slot["comparison"]
    assert (comparison["colocated_goodput"], comparison["disaggregated_goodput"]) == (co["goodput_rate"],
                                                                                      dis["goodput_rate"])
    if co["goodput_rate"] and dis["goodput_rate"] is not None:
        assert comparison["ratio"] == pytest.approx(dis["goodput_rate"] / co["goodput_rate"])
    else:
        assert comparison["ratio"] is None
    assert set(comparison["ratios"]) == {"disaggregated", "disaggregated-slo"}
    [looser] = slot["slo_sensitivity"]  # TPOT <= 1000 ms: no request misses that the 100 ms limit let pass
    assert (looser["ttft_ms"], looser["tpot_ms"]) == (1000, 1000)
    for name, entry in slot["layouts"].items():
        assert [rate for rate, _ in looser["attainment"][name]] == [2, 4]
        assert all(att >= run["summary"]["slo_attainment"] for (_, att), run in zip(looser["attainment"][name],
                                                                                     entry["runs"]))
    assert path.with_name(f"{path.stem}_chatbot_attainment.png").is_file()
    assert not list((tmp_path / "state").iterdir())  # a cluster's state dir goes once its run succeeded
    out, err = capsys.readouterr()
    assert "colocated" in out and "disaggregated / colocated goodput:" in out
    assert "[disagg_bench] rate 4/s  decode-0: " in err and " steps of " in err
    assert "disaggregated-slo / colocated goodput:" in out
    assert "    TPOT <= 1000 ms: colocated " in out
    assert "  model work offered, at rate (share of " in out


def test_cpu_run_of_colocated_variants_keeps_each_and_counts_the_best(tmp_path, capsys):
    """--colocated-max-batched-tokens / --colocated-step-target-ms: one cluster per way the mixed
    layout runs, all kept; the best at the headline SLO is the layout's entry."""
    path = tmp_path / "variants.json"
    argv = ["--preset", "cpu-demo", "--workloads", "chatbot", "--scale", "0.05", "--rates", "4", "--duration", "2",
            "--drain-timeout", "20", "--state-dir", str(tmp_path / "state"), "--results-file", str(path),
            "--layouts", "colocated", "--colocated-max-batched-tokens", "512,32", "--colocated-step-target-ms", "50",
            "--also-tpot-ms", "1000", "--no-plots"]
    assert disagg_bench.main(argv) == 0
    slot = json.loads(path.read_text())["workloads"]["chatbot"]
    group = [slot["layouts"]["colocated"], *slot["variants"]["colocated"]]
    shapes = sorted((e["settings"]["max_batched_tokens"], e["settings"].get("step_target_ms", 0)) for e in group)
    assert shapes == [(32, 0), (512, 0), (512, 50)]  # the preset's budget (512) with the target
    goodputs = [-1 if e["goodput_rate"] is None else e["goodput_rate"] for e in group]
    assert goodputs[0] == max(goodputs)
    for entry in group:
        assert all(run["summary"]["ok"] == run["summary"]["requests"] > 0 for run in entry["runs"])
    [looser] = slot["slo_sensitivity"]
    assert "colocated" in looser["chosen"]
    out = capsys.readouterr().out
    assert "colocated: the best at each SLO limit of 3 runs" in out


def test_other_worker_counts_get_their_own_results_file(tmp_path):
    preset = PRESETS["cpu-demo"]
    two, four = disagg_report.results_path(tmp_path, preset), disagg_report.results_path(tmp_path, preset, 4)
    assert four.name == two.name.replace(".json", "-x4.json")
    assert disagg_report.results_path(tmp_path, preset, 2, gpus=1) == two  # CPU workers share no GPU
    for name in ("disagg_gpu-llama3-8b_nvidia-h200.json", "disagg_gpu-llama3-8b_nvidia-h200-x4.json"):
        (tmp_path / name).write_text("{}")
    gpu = PRESETS["gpu-llama3-8b"]
    found = {w: disagg_report.existing_results_path(tmp_path, gpu, w).name for w in (2, 4)}
    assert found == {2: "disagg_gpu-llama3-8b_nvidia-h200.json", 4: "disagg_gpu-llama3-8b_nvidia-h200-x4.json"}
    with pytest.raises(ValueError, match="no gpu-llama3-8b results"):
        disagg_report.existing_results_path(tmp_path, gpu, 3)
    (tmp_path / "disagg_gpu-llama3-8b_nvidia-h200-x4_2gpu.json").write_text("{}")
    with pytest.raises(ValueError, match="2 gpu-llama3-8b results"):  # four workers on four GPUs or on two
        disagg_report.existing_results_path(tmp_path, gpu, 4)


def test_ratio_text_names_a_layout_that_met_a_limit_nowhere_once():
    item = {"goodput": {"colocated": 56, "disaggregated": None, "disaggregated-slo": 56}, "ratio": None,
            "ratios": {"disaggregated": None, "disaggregated-slo": 1.0}}
    assert disagg_report._ratio_text(item, {"colocated": 64, "disaggregated-slo": 64}) == \
        "disaggregated met it at no swept rate; disaggregated-slo 1.00x"
    baseline_nowhere = {"goodput": {"colocated": None, "disaggregated": 5, "disaggregated-slo": 3}, "ratio": None,
                        "ratios": {"disaggregated": None, "disaggregated-slo": None}}
    assert disagg_report._ratio_text(baseline_nowhere, {"colocated": 7, "disaggregated": 7, "disaggregated-slo": 7}) == \
        "colocated met it at no swept rate"
