"""``tandem bench serve``: the SLO math and workloads exactly, then real runs against a local cluster."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import signal
import time
from dataclasses import replace

import pytest

from tests.integration.cluster import local_cluster
from tools.bench import serve_bench
from tools.bench.client_processes import (ClientPool, ClientProcessError, SendSettings, deal_round_robin,
                                          merge)
from tools.bench.serve_clients import LoadClient, Measurement, Progress
from tools.bench.slo import (SLO, RequestRecord, attainment, goodput, later_tpot_ms, peak_in_flight, percentile,
                            summarize)
from tools.bench.workloads import WORKLOADS, BenchRequest, TraceError, fit_lengths, load_trace, synthetic_requests
from tools.demo import DEMO_MODEL_DIR

# -- percentiles, attainment, goodput --------------------------------------------------------


def test_percentile_interpolates_linearly_between_ranks():
    values = list(range(0, 101, 10))  # 11 values: rank = p / 10
    random.Random(0).shuffle(values)
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50, 90, 99.0)
    assert (percentile(values, 0), percentile(values, 100), percentile(values, 95)) == (0, 100, 95.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 25) == 1.75
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def _rec(i: int, ttft: float | None, tpot: float | None, ok: bool = True, *, sent: float = 0.0,
         e2e: float | None = 100.0, out: int = 10, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=i, scheduled_s=sent, sent_s=sent, input_len=5, output_len_requested=out,
                         output_len=out if ok else 0, ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e if ok else None,
                         ok=ok, error=error)


def test_attainment_counts_failures_as_misses_and_undefined_tpot_as_met():
    records = [_rec(0, 100, 10), _rec(1, 300, 10), _rec(2, 100, 50), _rec(3, 200, None),
               _rec(4, None, None, ok=False, error="timeout: x")]
    assert attainment(records, SLO(ttft_ms=200, tpot_ms=20)) == 2 / 5  # 0 and 3
    assert attainment(records, SLO(ttft_ms=200)) == 3 / 5
    assert attainment(records, SLO(tpot_ms=20)) == 3 / 5
    assert attainment(records, SLO()) == 4 / 5  # no SLO: the success rate
    assert attainment([], SLO(ttft_ms=1)) is None


def test_goodput_is_the_highest_rate_at_or_above_90_percent():
    assert goodput([(1, 1.0), (2, 0.9), (4, 0.89)]) == 2
    assert goodput([(1, 0.95), (2, 0.5), (4, 0.92)]) == 4  # whatever lower rates did
    assert goodput([(1, 0.5), (2, None)]) is None
    assert goodput([]) is None


def test_summarize_exact():
    records = [_rec(0, 10, 2, sent=0.5, e2e=500, out=4), _rec(1, 30, 4, sent=1.0, e2e=1000, out=6),
               _rec(2, None, None, ok=False, error="timeout: still running")]
    s = summarize(records, SLO(ttft_ms=20))
    assert (s["requests"], s["ok"], s["failed"], s["timeouts"]) == (3, 2, 1, 1)
    assert s["ttft_ms"] == {"p50": 20.0, "p90": 28.0, "p99": 29.8, "mean": 20.0}
    assert s["tpot_ms"] == {"p50": 3.0, "p90": 3.8, "p99": 3.98, "mean": 3.0}
    assert s["e2e_ms"]["p50"] == 750.0
    assert s["span_s"] == 2.0  # the last success ends 1.0 + 1.0 s after the window opened
    assert (s["output_tokens"], s["output_tokens_per_s"], s["requests_per_s"]) == (10, 5.0, 1.0)
    assert s["slo_attainment"] == 1 / 3
    assert serve_bench.describe_summary(s) == ("2/3 ok, TTFT 20.0/28.0 ms, TPOT 3.0/3.8 (-/- after the 1st gap) ms, "
                                               "1st gap -/- ms (p50/p90), SLO met 33%")


def test_peak_in_flight_counts_requests_between_send_and_end():
    # sent at 0, 0.5, 1.0 s; ends at 1.0, 1.5, 1.2 s: the first ends as the third is sent
    records = [_rec(0, 10, 1, sent=0.0, e2e=1000), _rec(1, 10, 1, sent=0.5, e2e=1000), _rec(2, 10, 1, sent=1.0, e2e=200),
               _rec(3, None, None, ok=False, sent=0.6)]
    assert peak_in_flight(records) == 2
    assert summarize(records, SLO())["peak_in_flight"] == 2
    assert peak_in_flight([]) == 0


def test_later_tpot_leaves_the_first_gap_out():
    # 12 tokens in 10 + 90 + 10 x 20 ms: TPOT spreads the 90 ms gap, the pace after it is 20 ms
    r = replace(_rec(0, 10, 290 / 11, e2e=300, out=12), first_gap_ms=90)
    assert later_tpot_ms(r) == 20
    assert summarize([r], SLO())["later_tpot_ms"]["p50"] == 20
    assert later_tpot_ms(replace(r, output_len=2)) is None and later_tpot_ms(replace(r, first_gap_ms=None)) is None


# -- workloads, arrivals, traces -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads_are_seeded_and_fit_the_context(name):
    a = synthetic_requests(name, 40, seed=3, max_context=1024, vocab_size=3000, scale=0.1)
    assert a == synthetic_requests(name, 40, seed=3, max_context=1024, vocab_size=3000, scale=0.1)
    assert a[:10] == synthetic_requests(name, 10, seed=3, max_context=1024, vocab_size=3000, scale=0.1)
    assert a != synthetic_requests(name, 40, seed=4, max_context=1024, vocab_size=3000, scale=0.1)
    full = synthetic_requests(name, 40, seed=3, max_context=1024, vocab_size=3000)
    for r in a + full:
        assert r.input_len >= 1 and r.output_len >= 2 and r.input_len + r.output_len <= 1024
        assert all(10 <= t < 3000 for t in r.prompt)
    others = [synthetic_requests(o, 1, seed=3, max_context=1024, vocab_size=3000) for o in WORKLOADS if o != name]
    assert all(o[0].prompt[:8] != full[0].prompt[:8] for o in others)  # no shared prefixes across workloads
    if name == "summarization":  # 4000-8000 token inputs cut to the context
        assert {r.input_len + r.output_len for r in full} == {1024}
        assert all(40 * 0.1 <= r.input_len / 10 <= 80 for r in a)


def test_fit_lengths():
    assert fit_lengths(200, 150, 1024) == (200, 150)
    assert fit_lengths(200, 150, 1024, scale=0.05) == (10, 8)
    assert fit_lengths(3, 1, 1024, scale=0.1) == (1, 2)  # floors: 1 input, 2 output tokens
    assert fit_lengths(6000, 150, 1024) == (874, 150)
    assert fit_lengths(10, 5000, 1024) == (1, 1023)
    assert fit_lengths(10, 1, 1024, min_output=1) == (10, 1)


def test_a_rate_has_its_own_seed_whatever_the_sweep():
    assert serve_bench.rate_seed(3, 72) == serve_bench.rate_seed(3, 72.0)
    seeds = {serve_bench.rate_seed(s, r) for s in (0, 1, 2) for r in (0.5, 1, 2, 40, 48, 72, 72.5, 1000)}
    assert len(seeds) == 24


def test_poisson_arrivals_are_seeded_and_bounded():
    a = serve_bench.poisson_arrivals(50, 10, 10_000, seed=1)
    assert a == serve_bench.poisson_arrivals(50, 10, 10_000, seed=1)
    assert a == sorted(a) and 0 < a[0] and a[-1] < 10
    assert 400 < len(a) < 600
    assert serve_bench.poisson_arrivals(50, 10, 7, seed=1) == a[:7]


def _trace(tmp_path, *lines: str):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_trace_requests(tmp_path):
    path = _trace(tmp_path, '{"timestamp_s": 2.0, "prompt": "def f(x):", "output_tokens": 5}', "",
                  '{"timestamp_s": 0.5, "prompt_tokens": 2000, "output_tokens": 100}',
                  '{"timestamp_s": 1, "prompt_token_ids": [11, 12, 13], "output_tokens": 1}')
    reqs = load_trace(path, 0, max_context=1024, vocab_size=3000)
    assert [r.arrival_s for r in reqs] == [0.5, 1.0, 2.0]
    assert (reqs[0].input_len, reqs[0].output_len) == (924, 100)
    assert reqs[1] == BenchRequest((11, 12, 13), 1, 1.0)
    assert reqs[2] == BenchRequest("def f(x):", 5, 2.0) and reqs[2].input_len is None
    assert load_trace(path, 0, max_context=1024, vocab_size=3000) == reqs


@pytest.mark.parametrize("lines,message", [
    (['{"prompt_tokens": 5, "output_tokens": 2}', '{"prompt_tokens": 5, "output_tokens": 2'], ":2: not valid JSON"),
    (['{"prompt_tokens": 5}'], ":1: output_tokens must be an integer >= 1, got null"),
    (["", '{"prompt_tokens": 5, "prompt": "x", "output_tokens": 2}'], ":2: give exactly one of"),
    (['{"prompt_tokens": 0, "output_tokens": 2}'], ":1: prompt_tokens must be an integer >= 1, got 0"),
    (['{"prompt_token_ids": [1, 5000], "output_tokens": 2}'], ":1: prompt_token_ids must be a non-empty list"),
    (['{"prompt_tokens": 5, "output_tokens": 2, "temp": 1}'], ":1: unknown field(s) temp"),
    (['{"timestamp_s": -1, "prompt_tokens": 5, "output_tokens": 2}'], ":1: timestamp_s must be a number >= 0"),
    (['{"timestamp_s": 0, "prompt_tokens": 5, "output_tokens": 2}', '[1]'], ":2: each line must be a JSON object"),
    (['{"timestamp_s": 0, "prompt_tokens": 5, "output_tokens": 2}', '{"prompt_tokens": 5, "output_tokens": 2}'],
     ":2: timestamp_s is missing, but line 1 has one"),
])
def test_trace_errors_name_the_line(tmp_path, lines, message):
    path = _trace(tmp_path, *lines)
    with pytest.raises(TraceError) as e:
        load_trace(path, 0, max_context=1024, vocab_size=3000)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_bad_arguments_exit_2(capsys):
    for argv in (["--url", "http://x"], ["--url", "http://x", "--rate", "0"],
                 ["--url", "http://x", "--sweep-rates", "1,a"], ["--url", "http://x", "--sweep-rates", "2,4,2.0"], ["--url", "http://x", "--rate", "1", "--scale", "0"],
                 ["--url", "http://x", "--rate", "1", "--client-processes", "0"],
                 ["--url", "http://x", "--rate", "1", "--connections", "0"]):
        with pytest.raises(SystemExit) as e:
            serve_bench.main(argv)
        assert e.value.code == 2, argv


def test_requests_are_dealt_round_robin_and_merged_in_plan_order():
    requests = [BenchRequest((10 + i,), 2) for i in range(7)]
    arrivals = [0.5 * i for i in range(7)]
    shares = deal_round_robin(arrivals, requests, 3)
    assert [s.indices for s in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [s.arrivals for s in shares] == [[0.0, 1.5, 3.0], [0.5, 2.0], [1.0, 2.5]]
    assert [[r.prompt[0] for r in s.requests] for s in shares] == [[10, 13, 16], [11, 14], [12, 15]]
    assert [s.indices for s in deal_round_robin(arrivals[:1], requests[:1], 2)] == [[0], []]
    parts = [[_rec(i, 1.0, 1.0) for i in s.indices] for s in shares]
    assert [r.index for r in merge(parts, 7)] == list(range(7))
    with pytest.raises(AssertionError):
        merge(parts[:2], 7)  # a process's records missing


# -- against a real cluster ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("cluster"), DEMO_MODEL_DIR) as state:
        yield state


def _run(tmp_path, url: str, *extra: str) -> dict:
    argv = ["--url", url, "--scale", "0.05", "--seed", "5", "--results-dir", str(tmp_path), "--label", "t",
            "--ttft-slo-ms", "5000", "--tpot-slo-ms", "1000", "--drain-timeout", "30", *extra]
    assert serve_bench.main(argv) == 0
    [path] = tmp_path.glob("serve_*.json")
    return json.loads(path.read_text())


def _check_all_ok(report: dict, rate: float, duration: float, seed: int) -> None:
    run = next(r for r in report["runs"] if r["rate"] == rate)
    assert run["seed"] == serve_bench.rate_seed(seed, rate)
    planned = serve_bench.poisson_arrivals(rate, duration, int(2 * rate * duration), run["seed"])
    reqs = run["requests"]
    assert len(reqs) == len(planned) > 0
    assert all(r["ok"] and r["error"] is None for r in reqs), [r["error"] for r in reqs]
    assert [r["output_len"] for r in reqs] == [r["output_len_requested"] for r in reqs]
    assert all(r["ttft_ms"] > 0 and r["tpot_ms"] >= 0 and r["e2e_ms"] >= r["ttft_ms"] for r in reqs)
    with_gap = [r for r in reqs if r["first_gap_ms"] is not None]
    assert with_gap and all(0 <= r["first_gap_ms"] <= r["e2e_ms"] for r in with_gap)
    assert run["summary"]["first_gap_ms"]["p50"] is not None
    assert run["summary"]["slo_attainment"] == 1.0 and run["summary"]["ok"] == len(reqs)
    assert [r["cached_prompt_tokens"] for r in reqs] == [0] * len(reqs)  # no prompt was sent twice


def test_http_sweep(cluster, tmp_path, capsys):
    report = _run(tmp_path, cluster.http_url, "--sweep-rates", "2,4", "--duration", "2")
    _check_all_ok(report, 2, 2, seed=5)
    _check_all_ok(report, 4, 2, seed=5)  # a seed of its own per rate
    assert report["goodput"]["rate"] == 4
    assert report["config"]["url"] == cluster.http_url and report["environment"]["git_commit"]
    assert {p.name for p in tmp_path.glob("*.png")} == {"serve_chatbot_t_latency_cdf.png",
                                                        "serve_chatbot_t_slo_attainment.png"}
    out = capsys.readouterr().out
    assert "goodput (highest rate with >= 90% meeting the SLO): 4 requests/s" in out


def test_grpc_run(cluster, tmp_path):
    report = _run(tmp_path, f"grpc://{cluster.grpc_address}", "--workload", "code", "--rate", "4",
                  "--duration", "3", "--seed", "7")  # 5 at rate 4 is the sweep's: its prompts would hit the cache
    _check_all_ok(report, 4, 3, seed=7)
    assert report["goodput"] is None and report["workload"] == "code"
    assert [p.name for p in tmp_path.glob("*.png")] == ["serve_code_t_latency_cdf.png"]


def test_trace_replay_and_drain_timeout(cluster, tmp_path):
    trace = _trace(tmp_path, '{"timestamp_s": 0.0, "prompt": "def fibonacci(n):", "output_tokens": 4}',
                   '{"timestamp_s": 0.2, "prompt_token_ids": [100, 200, 300], "output_tokens": 3}',
                   '{"timestamp_s": 0.3, "prompt_tokens": 20, "output_tokens": 1000}')
    report = _run(tmp_path, cluster.grpc_address, "--trace", str(trace), "--rate", "1", "--duration", "5",
                  "--drain-timeout", "1.5", "--no-plots")
    reqs = report["runs"][0]["requests"]
    assert [r["ok"] for r in reqs] == [True, True, False]
    assert reqs[0]["input_len"] > 0 and [r["output_len"] for r in reqs[:2]] == [4, 3]
    assert reqs[2]["error"].startswith("timeout")
    assert report["runs"][0]["summary"]["timeouts"] == 1
    assert report["runs"][0]["summary"]["slo_attainment"] == 2 / 3
    assert report["workload"] == "trace-t" and not list(tmp_path.glob("*.png"))


def _check_from_client_processes(report: dict, rate: float, duration: float, seed: int) -> None:
    """Every planned request has exactly one record, under its plan index, sent at its arrival
    time on the common clock (a client process on another clock would be seconds off)."""
    run = next(r for r in report["runs"] if r["rate"] == rate)
    planned = serve_bench.poisson_arrivals(rate, duration, int(2 * rate * duration), serve_bench.rate_seed(seed, rate))
    reqs = run["requests"]
    assert [r["index"] for r in reqs] == list(range(len(planned)))
    assert [r["scheduled_s"] for r in reqs] == [round(a, 6) for a in planned]
    lags = [r["sent_s"] - r["scheduled_s"] for r in reqs]
    assert all(-0.001 < lag < 0.5 for lag in lags), lags
    _check_all_ok(report, rate, duration, seed)


def test_http_sweep_from_two_client_processes(cluster, tmp_path):
    report = _run(tmp_path, cluster.http_url, "--sweep-rates", "2,4", "--duration", "2", "--client-processes", "2",
                  "--seed", "21", "--no-plots")  # seeds of their own (no prompt the other tests sent): 6 and 8 requests
    _check_from_client_processes(report, 2, 2, seed=21)
    _check_from_client_processes(report, 4, 2, seed=21)
    assert report["config"]["client_processes"] == 2
    assert multiprocessing.active_children() == []  # stopped, and nothing left behind


def test_grpc_run_from_two_client_processes(cluster, tmp_path):
    report = _run(tmp_path, f"grpc://{cluster.grpc_address}", "--rate", "4", "--duration", "2",
                  "--client-processes", "2", "--seed", "24", "--no-plots")  # 12 requests
    _check_from_client_processes(report, 4, 2, seed=24)
    assert report["config"]["client_processes"] == 2
    assert multiprocessing.active_children() == []


def _established_to(port: int) -> int:
    """TCP connections on this host in state ESTABLISHED whose remote end is ``port`` (Linux)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


@pytest.mark.parametrize("connections", [1, 3])
def test_a_grpc_client_opens_its_connections_up_front_and_rotates_requests_over_them(cluster, connections):
    port = int(cluster.grpc_address.rsplit(":", 1)[1])

    async def main() -> tuple[int, list[bool]]:
        client = LoadClient.for_url(f"grpc://{cluster.grpc_address}", connections)
        before = _established_to(port)
        try:
            info = await client.info("")
            opened = _established_to(port) - before
            ok = []
            for i in range(2 * connections):
                m = Measurement(time.perf_counter())
                await client.send(BenchRequest((100 + i, 200, 300), 2), m, info.model, 0.0)
                ok.append(m.error is None and m.tokens == 2)
            assert _established_to(port) - before == opened  # requests reuse the connections
            return opened, ok
        finally:
            await client.close()

    opened, ok = asyncio.run(main())
    assert opened == connections and all(ok)


def test_a_client_process_that_raises_or_dies_fails_the_call_and_the_others_stop(cluster):
    async def model() -> str:
        client = LoadClient.for_url(cluster.http_url)
        try:
            return (await client.info("")).model
        finally:
            await client.close()

    async def raises():  # each process's first info() call fails
        await ClientPool.start(SendSettings(cluster.http_url, "no-such-model", 0.0, 5.0), 2)

    async def dies(name: str):
        pool = await ClientPool.start(SendSettings(cluster.http_url, name, 0.0, 5.0), 2)
        try:
            requests = [BenchRequest((100 + i, 200 + i), 2) for i in range(3)]
            await pool.deal([0.0, 0.05, 0.1], requests)
            records = await pool.run(time.perf_counter() + 0.2)
            assert [(r.index, r.ok) for r in records] == [(0, True), (1, True), (2, True)]
            assert pool.progress() == Progress(3, 3, 0)  # the processes' last counts, summed
            await pool.deal([0.0, 0.0], requests[:2])  # the next rate, same processes
            [victim] = [p for p in multiprocessing.active_children() if p.name == "tandem-bench-client-1"]
            os.kill(victim.pid, signal.SIGKILL)
            await pool.run(time.perf_counter() + 0.2)
        finally:
            await pool.close()

    with pytest.raises(ClientProcessError, match=r"client process \d \(pid \d+\) failed: RuntimeError: the server "
                                                 r"does not serve 'no-such-model'"):
        asyncio.run(raises())
    assert multiprocessing.active_children() == []
    with pytest.raises(ClientProcessError, match=r"client process 1 \(pid \d+\) exited \(exit code -9\) before it "
                                                 r"answered"):
        asyncio.run(dies(asyncio.run(model())))
    assert multiprocessing.active_children() == []
