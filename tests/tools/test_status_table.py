"""``tandem status``'s table: one row per worker with its published load and a live health probe."""

import asyncio

from services.common.registry import WorkerInfo, WorkerLoad
from tools.status_table import render_status


def _worker(worker_id: str, role: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, grpc_address="127.0.0.1:1", ucx_address="", model="m",
                      model_fingerprint="f", block_size=16, total_kv_blocks=100, max_model_len=1024, version="0",
                      host="h", pid=41)


def test_rows_show_load_the_measured_prefill_speed_and_time_per_output_token():
    workers = [_worker("prefill-0", "prefill"), _worker("decode-0", "decode"), _worker("mixed-0", "mixed")]
    loads = {"prefill-0": WorkerLoad(queued_prefill_tokens=300, running_requests=1, free_kv_blocks=90,
                                     total_kv_blocks=100, prefill_tokens_per_s=35210.4, prefill_rate_age_s=0.5),
             "decode-0": WorkerLoad(running_requests=7, free_kv_blocks=60, total_kv_blocks=100,
                                    token_interval_ms=12.345),
             "mixed-0": WorkerLoad(prefill_tokens_per_s=1234.0, prefill_rate_age_s=300.0, total_kv_blocks=100,
                                   token_interval_ms=30.0)}
    header, *rows = asyncio.run(render_status(workers, loads, {"decode-0": 42})).splitlines()
    assert header.split() == ["ROLE", "ID", "GRPC", "UCX", "RUNNING", "WAITING", "QUEUED-TOK", "PREFILL-TOK/S",
                              "TPOT-MS", "FREE-BLOCKS", "HEALTH", "PID"]
    cells = [row.split() for row in rows]
    # the prefill worker runs a request whose decoding has not been timed
    assert cells[0][:10] == ["prefill", "prefill-0", "127.0.0.1:1", "-", "1", "0", "300", "35,210", "-", "90/100"]
    # no prompt computed yet; its 7 requests decode at 12.3 ms per token; local pid
    assert cells[1][7:10] == ["-", "12.3", "60/100"] and cells[1][-1] == "42"
    assert " 1,234 (5 min ago)  - " in rows[2]  # nothing runs: its last interval is no one's
    assert cells[0][10] != "serving"  # nothing listens on port 1


def test_no_workers():
    assert asyncio.run(render_status([], {}, {})) == "no workers registered"
