"""The `tandem` command as a user runs it: real subprocesses, stdout vs stderr, exit codes."""

from __future__ import annotations

import subprocess
import sys

from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tools.demo import DEMO_MODEL_DIR


def _tandem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_prints_only_the_completion():
    done = _tandem("generate", "--max-tokens", "24", "def fibonacci(n):")
    assert done.returncode == 0, done.stderr
    want = LLMEngine.from_pretrained(DEMO_MODEL_DIR).generate(
        ["def fibonacci(n):"], SamplingParams(max_tokens=24, temperature=0))[0].text
    assert done.stdout == want + "\n"


def test_generate_with_moe_model_and_sampling_options():
    done = _tandem("generate", "--model", str(DEMO_MODEL_DIR.parent / "moe"), "--max-tokens", "8",
                   "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--dtype", "bfloat16", "import os\n")
    again = _tandem("generate", "--model", str(DEMO_MODEL_DIR.parent / "moe"), "--max-tokens", "8",
                    "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--dtype", "bfloat16", "import os\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == again.stdout and done.stdout.strip()


def test_bad_input_exits_2_with_one_clear_line():
    cases = {
        ("--max-tokens", "0", "x"): "max_tokens must be an integer >= 1",
        ("--temperature", "-1", "x"): "temperature must be >= 0",
        ("--model", "/nonexistent", "x"): "does not exist",
        ("",): "prompt is empty",
        ("--max-tokens", "2000", "x"): "exceeds the context length",
        ("--device", "tpu", "x"): "device must be",
    }
    for args, message in cases.items():
        done = _tandem("generate", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and done.stdout == "", (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_generate_into_a_closed_pipe_exits_quietly():
    """``tandem generate ... | head -c 1``: the reader leaves; no traceback, the shell's SIGPIPE status."""
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "generate", "--max-tokens", "8", "import os"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_serve_refuses_a_negative_gil_switch_interval():
    done = _tandem("serve", "mixed", "--etcd", "http://127.0.0.1:9", "--gil-switch-interval-ms", "-1")
    assert done.returncode == 2 and "--gil-switch-interval-ms must be >= 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_bad_memory_sizes_before_loading_anything():
    for flag, message in (("--device-memory-bytes", "device_memory_bytes must be positive"),
                          ("--kv-cache-bytes", "kv_cache_bytes must be positive"),
                          ("--step-target-ms", "step_target_s must be > 0")):
        done = _tandem("serve", "decode", "--etcd", "http://127.0.0.1:9", flag, "0")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_serve_refuses_decode_pacing_on_a_worker_that_computes_prompts():
    done = _tandem("serve", "mixed", "--etcd", "http://127.0.0.1:9", "--decode-step-period-ms", "20")
    assert done.returncode == 2 and "decode pacing is for decode workers" in done.stderr
    assert "Traceback" not in done.stderr


def test_router_policy_flags_are_checked_before_anything_starts():
    for command in (("serve", "router", "--etcd", "http://127.0.0.1:9"), ("up", "--state-dir", "/nonexistent/x")):
        done = _tandem(*command, "--policy", "slo-aware", "--ttft-slo-ms", "500", "--tpot-slo-ms", "0")
        assert done.returncode == 2 and "TPOT target must be > 0 ms (--tpot-slo-ms)" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_up_gives_decode_workers_their_own_batch_limit(tmp_path):
    from tools.cluster_cmd import batch_limits

    assert batch_limits(None, None) == ([], {})
    assert batch_limits(128, 512) == (["--max-num-seqs", "128"], {"decode": ("--max-num-seqs", "512")})
    done = _tandem("up", "--decode-max-num-seqs", "0", "--state-dir", str(tmp_path))
    assert done.returncode == 2 and "--max-num-seqs and --decode-max-num-seqs must be >= 1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "cluster.json").exists()


def test_up_gives_mixed_workers_the_step_target(tmp_path):
    from tools.cluster_cmd import step_target_args

    assert step_target_args(None) == {}
    assert step_target_args(20.0) == {"mixed": ("--step-target-ms", "20")}
    done = _tandem("up", "--mixed", "1", "--step-target-ms", "0", "--state-dir", str(tmp_path))
    assert done.returncode == 2 and "--step-target-ms must be > 0" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "cluster.json").exists()


def test_policy_flags_given_are_passed_on():
    from tools.cli import _build_parser as build_parser
    from tools.serve_cmd import policy_flags

    args = build_parser().parse_args(["up", "--policy", "slo-aware", "--ttft-slo-ms", "500", "--tpot-slo-ms", "40"])
    assert policy_flags(args) == [("--ttft-slo-ms", 500.0), ("--tpot-slo-ms", 40.0)]
    args = build_parser().parse_args(["serve", "router", "--etcd", "x", "--slo-headroom", "0.7"])
    assert policy_flags(args) == [("--slo-headroom", 0.7)]


def test_generate_url_reports_an_unreachable_router():
    done = _tandem("generate", "--url", "http://127.0.0.1:9", "x")
    assert done.returncode == 2 and "cannot reach" in done.stderr


def test_serve_drains_on_sigterm_and_exits_0(etcd):
    """A real `tandem serve mixed` process: SIGTERM mid-stream finishes the stream, then exits 0."""
    import asyncio
    import signal

    import grpc

    from proto.tandem.v1 import tandem_pb2 as pb
    from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
    from services.common.registry import read_cluster
    from tools.local_cluster import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", "mixed", "--etcd", etcd.url, "--id", "m0",
                             "--grpc-port", str(port), "--kv-cache-bytes", str(32 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        async def main() -> int:
            for _ in range(240):
                if any(w.worker_id == "m0" for w in (await read_cluster(etcd.url, "default"))[0]):
                    break
                await asyncio.sleep(0.25)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = pb_grpc.DecodeWorkerStub(ch).Decode(pb.DecodeRequest(
                    request_id="r", prompt_token_ids=[5, 6, 7],
                    sampling=pb.SamplingOptions(max_tokens=400, temperature=0, ignore_eos=True)))
                tokens = len((await call.read()).token_ids)
                proc.send_signal(signal.SIGTERM)
                while (event := await call.read()) is not grpc.aio.EOF:
                    tokens += len(event.token_ids)
                workers, _ = await read_cluster(etcd.url, "default")
                assert all(w.worker_id != "m0" for w in workers)  # deregistered while draining
                return tokens

        assert asyncio.run(main()) == 400
        assert proc.wait(timeout=60) == 0, proc.stdout.read()
    finally:
        proc.kill()
