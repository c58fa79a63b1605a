"""The workers' engine counters over a benchmark run (tools/bench/worker_counters.py): the
difference arithmetic on real ``WorkerStats`` messages, and real ``Stats`` calls to a small
in-process gRPC server and to an address where nothing listens."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.registry import WorkerInfo
from tools.bench.worker_counters import FIGURES, Snapshot, counted, describe, difference, snapshot
from tools.local_cluster import free_port


def _stats(steps: int = 0, step_s: float = 0.0, host_s: float = 0.0, computed: int = 0, prefill: int = 0,
           messages: int = 0, preemptions: int = 0, busy: int = 0, lag: tuple[float, int, int] = (0.0, 0, 0),
           joins: tuple[float, int] = (0.0, 0), full: int = 0, idle: float = 0.0, commands: float = 0.0
           ) -> pb.WorkerStats:
    """lag: the event loop's (total lag seconds, samples, stalls); joins: (seconds, count) of Decode
    calls with KV from a prefill worker, to their first token."""
    return pb.WorkerStats(steps=steps, step_seconds=step_s, host_seconds=host_s, computed_tokens=computed,
                          prefill_tokens=prefill, stream_messages=messages, preemptions=preemptions,
                          handoffs_refused_busy=busy, loop_lag_seconds=lag[0], loop_lag_samples=lag[1],
                          loop_stalls=lag[2], decode_join_seconds=joins[0], decode_joins=joins[1],
                          full_batch_steps=full, engine_idle_seconds=idle, engine_command_seconds=commands)


def _worker(worker_id: str, role: str, address: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, grpc_address=address, ucx_address="", model="m",
                      model_fingerprint="f", block_size=16, total_kv_blocks=100, max_model_len=1024, version="0",
                      host="h", pid=1)


def test_the_difference_of_two_snapshots_gives_per_worker_figures():
    roles = {"decode-0": "decode", "prefill-0": "prefill"}
    before = Snapshot(roles, {"decode-0": _stats(100, 1.0, 0.2, 500, 300, 90, preemptions=4, lag=(0.5, 100, 2),
                                                joins=(1.0, 40), full=10, idle=3.0, commands=0.5),
                              "prefill-0": _stats(10, 0.5, 0.1, 2000, 2000, 10, busy=1)})
    after = Snapshot(roles, {"decode-0": _stats(600, 11.0, 3.2, 4300, 600, 890, preemptions=9, lag=(2.5, 900, 12),
                                               joins=(4.0, 60), full=135, idle=7.0, commands=1.5),
                             "prefill-0": _stats(30, 2.5, 0.3, 8000, 7990, 30, busy=4)})
    figures = difference(before, after, wall_s=20.0)
    # decode-0: 500 steps in 10 s of 20; 3 s of host time; 3500 decode tokens (3800 computed, 300 prompt)
    assert figures["decode-0"] == {"role": "decode", "missing": False, "steps": 500, "mean_step_ms": 20.0,
                                   "host_share": 0.3, "busy": 0.5, "idle": 0.2, "commands": 0.05,
                                   "mean_decode_batch": 7.0,
                                   "prefill_tokens_per_s": 15.0, "messages_per_s": 40.0, "full_batch": 0.25,
                                   "preemptions": 5,
                                   "busy_refusals": 0, "loop_lag_ms": 2.5, "loop_stalls": 10,
                                   "join_ms": 150.0}
    # prefill-0: 6000 computed, 5990 of them prompt work: 10 decode tokens in 20 steps
    assert figures["prefill-0"] == {"role": "prefill", "missing": False, "steps": 20, "mean_step_ms": 100.0,
                                    "host_share": 0.1, "busy": 0.1, "idle": 0.0, "commands": 0.0,
                                    "mean_decode_batch": 0.5,
                                    "prefill_tokens_per_s": 299.5, "messages_per_s": 1.0, "full_batch": 0.0,
                                    "preemptions": 0,
                                    "busy_refusals": 3, "loop_lag_ms": None, "loop_stalls": 0,
                                    "join_ms": None}
    assert describe(figures["prefill-0"]).endswith("0 preemptions, loop lag - ms (0 stalls), 3 handoffs refused as busy")
    assert describe(figures["decode-0"]).endswith("5 preemptions, loop lag 2.5 ms (10 stalls), join 150.0 ms, "
                                                  "batch full in 25% of steps")


def test_figures_are_rounded():
    roles = {"mixed-0": "mixed"}
    figures = difference(Snapshot(roles, {"mixed-0": _stats()}),
                         Snapshot(roles, {"mixed-0": _stats(3, 0.1, 0.01, 10, 3, 7)}), wall_s=3.0)["mixed-0"]
    assert (figures["mean_step_ms"], figures["host_share"], figures["busy"], figures["mean_decode_batch"],
            figures["prefill_tokens_per_s"], figures["messages_per_s"]) == (33.333, 0.1, 0.033, 2.33, 1.0, 2.3)


def test_a_worker_without_steps_has_no_per_step_figures():
    roles = {"decode-0": "decode"}
    idle = Snapshot(roles, {"decode-0": _stats(7, 0.7, 0.1, 70, 7, 7)})
    figures = difference(idle, idle, wall_s=5.0)["decode-0"]
    assert figures == {"role": "decode", "missing": False, "steps": 0, "mean_step_ms": None, "host_share": None,
                       "busy": 0.0, "idle": 0.0, "commands": 0.0, "mean_decode_batch": None,
                       "prefill_tokens_per_s": 0.0, "messages_per_s": 0.0,
                       "full_batch": None, "preemptions": 0, "busy_refusals": 0, "loop_lag_ms": None, "loop_stalls": 0,
                       "join_ms": None}
    assert describe(figures) == ("0 steps of - ms, host -, busy 0% (idle 0%, commands 0%), decode batch -, "
                                 "prefill 0 tok/s, 0.0 messages/s, 0 preemptions, loop lag - ms (0 stalls)")
    assert difference(idle, idle, wall_s=0.0)["decode-0"]["busy"] is None


def test_a_worker_that_did_not_answer_either_read_is_missing():
    roles = {"prefill-0": "prefill", "decode-0": "decode"}
    answered = {"prefill-0": _stats(1, 0.1), "decode-0": _stats(2, 0.2)}
    for before, after in (({"prefill-0": answered["prefill-0"]}, answered),
                          (answered, {"prefill-0": answered["prefill-0"]})):
        figures = difference(Snapshot(roles, before), Snapshot(roles, after), wall_s=1.0)
        assert figures["decode-0"] == {"role": "decode", "missing": True, **dict.fromkeys(FIGURES)}
        assert figures["prefill-0"]["missing"] is False and figures["prefill-0"]["steps"] == 0
        assert describe(figures["decode-0"]) == "no counters (its Stats did not answer)"


class _Prefill(pb_grpc.PrefillWorkerServicer):
    async def Stats(self, request, context):
        return _stats(steps=11)


class _Decode(pb_grpc.DecodeWorkerServicer):
    async def Stats(self, request, context):
        return _stats(steps=22)


def test_each_role_is_asked_on_its_service_and_a_silent_worker_is_missing():
    async def main():
        server = grpc.aio.server()
        pb_grpc.add_PrefillWorkerServicer_to_server(_Prefill(), server)
        pb_grpc.add_DecodeWorkerServicer_to_server(_Decode(), server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            workers = [_worker("prefill-0", "prefill", address), _worker("mixed-0", "mixed", address),
                       _worker("decode-0", "decode", f"127.0.0.1:{free_port()}")]  # nothing listens there
            return await snapshot(workers)
        finally:
            await server.stop(None)

    taken = asyncio.run(main())
    assert taken.roles == {"prefill-0": "prefill", "mixed-0": "mixed", "decode-0": "decode"}
    assert {worker_id: s.steps for worker_id, s in taken.stats.items()} == {"prefill-0": 11, "mixed-0": 22}


def test_counted_fills_the_run_entry_and_logs_a_line_per_worker_and_the_cpu_shares():
    lines: list[str] = []
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    async def main():
        async with counted([_worker("decode-0", "decode", f"127.0.0.1:{free_port()}")], 2.0, lines.append,
                           {"router": gone.pid}, router_url=f"http://127.0.0.1:{free_port()}") as extra:
            assert extra == {}
            deadline = time.process_time() + 0.3
            while time.process_time() < deadline:  # the load generator (this process) keeps a core busy
                pass
        return extra

    extra = asyncio.run(main())
    assert extra["workers"] == {"decode-0": {"role": "decode", "missing": True, **dict.fromkeys(FIGURES)}}
    assert extra["cpu"]["router"] is None  # a process that cannot be read
    assert 0.3 < extra["cpu"]["load-generator"] < 1.5
    assert extra["router"] == {"loop_lag_ms": None, "loop_stalls": None, "join_ms": None}  # nothing answered there
    assert lines[0] == "rate 2/s  decode-0: no counters (its Stats did not answer)"
    assert lines[1] == "rate 2/s  router: loop lag - ms (- stalls)"
    assert lines[2].startswith("rate 2/s  CPU (cores busy): router -, load-generator ")


def test_a_named_child_of_the_load_generator_is_not_counted_in_it():
    # a busy cluster process started by this one (so its child), named as the router
    named = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    async def main():
        await asyncio.sleep(0.3)  # past its start-up
        async with counted([], 1.0, lambda _: None, {"router": named.pid}) as extra:
            await asyncio.sleep(1.0)  # this process itself idles
        return extra

    try:
        extra = asyncio.run(main())
    finally:
        named.kill()
        named.wait()
    assert 0.3 < extra["cpu"]["router"] <= 1.1
    # counted in it, the busy child would add as much as the router's share; what is left is this
    # process and the test session's other children (an idle etcd), a little of a core on a busy machine
    assert extra["cpu"]["load-generator"] < extra["cpu"]["router"] / 2
