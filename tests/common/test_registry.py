"""Registry against a real etcd: registration, load, expiry, outages (SIGSTOP), restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aetcd
import pytest

from services.common.etcd_server import EtcdServer, EtcdServerError, find_etcd_binary
from services.common.registry import (
    Membership,
    MembershipChange,
    Registration,
    RegistryUnavailableError,
    WorkerInfo,
    WorkerLoad,
    _bounded,
    read_cluster,
)

_REPO_ROOT = Path(__file__).resolve().parents[2]
_TTL_S = 2

# A worker in its own process: registers, says "ready", then waits to be SIGKILLed.
_CRASHING_WORKER = """
import asyncio, sys
from services.common.registry import Registration, WorkerInfo
async def main(url, cluster, info_json):
    reg = Registration(url, cluster, WorkerInfo.from_json(info_json), ttl_s=int(sys.argv[4]))
    await reg.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main(*sys.argv[1:4]))
"""


def make_info(worker_id: str, role: str = "decode") -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, role=role, grpc_address="127.0.0.1:50051", ucx_address="127.0.0.1:50052",
        model="demo-tiny", model_fingerprint="fp0", block_size=16, total_kv_blocks=128,
        max_model_len=2048, version="0.1.0", host="localhost", pid=os.getpid(),
    )


def ids(membership: Membership, role: str | None = None) -> list[str]:
    return [w.worker_id for w in membership.workers(role)]


def load_field(membership: Membership, worker_id: str, field: str) -> int | None:
    load = membership.load(worker_id)
    return None if load is None else getattr(load, field)


async def wait_until(predicate, timeout_s: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


async def spawn_worker(url: str, cluster: str, info: WorkerInfo) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_WORKER, url, cluster, info.to_json(), str(_TTL_S),
        cwd=_REPO_ROOT, stdout=asyncio.subprocess.PIPE,
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 15)
    assert line.strip() == b"ready"
    return proc


async def key_lease(url: str, key: bytes) -> int | None:
    host, port = url.removeprefix("http://").split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=2) as client:
        kv = await client.get(key)
    return None if kv is None else kv.lease


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- records and the server --------------------------------------------------------------


def test_records_round_trip_json():
    info = make_info("d0")
    assert WorkerInfo.from_json(info.to_json()) == info
    assert WorkerInfo.from_json(info.to_json().encode()) == info
    load = WorkerLoad(queued_prefill_tokens=3, free_kv_blocks=7, updated_unix_s=1.5)
    assert WorkerLoad.from_json(load.to_json()) == load
    with pytest.raises(ValueError):
        make_info("d/0")
    with pytest.raises(ValueError):
        make_info("d0", role="teapot")


def test_find_etcd_binary(monkeypatch, tmp_path):
    path = find_etcd_binary()
    assert os.access(path, os.X_OK)
    monkeypatch.setenv("TANDEM_ETCD_BINARY", str(tmp_path / "missing"))
    with pytest.raises(EtcdServerError, match="TANDEM_ETCD_BINARY"):
        find_etcd_binary()


@pytest.mark.asyncio
async def test_restart_with_same_data_dir_keeps_keys(etcd):
    url = etcd.url
    host, port = url.removeprefix("http://").split(":")
    async with aetcd.Client(host=host, port=int(port), timeout=2) as client:
        await client.put(b"/tandem/t/config/x", b"42")
    await asyncio.to_thread(etcd.stop)
    assert await asyncio.to_thread(etcd.start) == url  # same ports on restart
    async with aetcd.Client(host=host, port=int(port), timeout=2) as client:
        assert (await client.get(b"/tandem/t/config/x")).value == b"42"
    # A new server object on the same data dir (new ports) finds the data too.
    await asyncio.to_thread(etcd.stop)
    other = EtcdServer(etcd.data_dir)
    other_url = await asyncio.to_thread(other.start)
    try:
        host, port = other_url.removeprefix("http://").split(":")
        async with aetcd.Client(host=host, port=int(port), timeout=2) as client:
            assert (await client.get(b"/tandem/t/config/x")).value == b"42"
    finally:
        await asyncio.to_thread(other.stop)


# -- registration and membership -----------------------------------------------------------


@pytest.mark.asyncio
async def test_register_publish_load_and_close(etcd):
    membership = Membership(etcd.url, "c1")
    await membership.start()
    changes = membership.subscribe()
    assert membership.connected and ids(membership) == []

    decode = Registration(etcd.url, "c1", make_info("d0"), ttl_s=_TTL_S)
    prefill = Registration(etcd.url, "c1", make_info("p0", role="prefill"), ttl_s=_TTL_S)
    await decode.start()
    await prefill.start()
    await wait_until(lambda: ids(membership) == ["d0", "p0"], 5, "both workers")
    assert membership.workers("decode") == [make_info("d0")]
    assert ids(membership, "prefill") == ["p0"]
    assert membership.load("d0") is None  # nothing published yet

    await decode.publish_load(WorkerLoad(running_requests=3, free_kv_blocks=100, total_kv_blocks=128))
    await wait_until(lambda: load_field(membership, "d0", "running_requests") == 3, 5, "load update")
    assert membership.load("d0").free_kv_blocks == 100

    await decode.close()
    await wait_until(lambda: ids(membership) == ["p0"], 5, "d0 gone")
    assert membership.load("d0") is None
    workers, loads = await read_cluster(etcd.url, "c1")
    assert [w.worker_id for w in workers] == ["p0"] and loads == {}
    assert await read_cluster(etcd.url, "other-cluster") == ([], {})

    await prefill.close()
    await membership.close()
    got = [changes.get_nowait() for _ in range(changes.qsize())]
    assert [(c.kind, c.worker.worker_id) for c in got] == [
        ("added", "d0"), ("added", "p0"), ("removed", "d0"), ("removed", "p0")]


@pytest.mark.asyncio
async def test_crashed_worker_disappears_after_ttl(etcd):
    membership = Membership(etcd.url, "c2")
    await membership.start()
    proc = await spawn_worker(etcd.url, "c2", make_info("d-crash"))
    try:
        await wait_until(lambda: ids(membership) == ["d-crash"], 5, "worker visible")
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)  # no deregistration, no more refreshes
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    await wait_until(lambda: ids(membership) == [], _TTL_S + 3, "expiry")
    gone_after_s = time.monotonic() - killed_at
    assert gone_after_s <= _TTL_S + 2.5
    assert membership.load("d-crash") is None
    await membership.close()


@pytest.mark.asyncio
async def test_outage_longer_than_ttl_keeps_view_and_heals(etcd):
    """etcd SIGSTOPped ~5 s (> TTL): readers keep the last view, writers never raise,
    and afterwards the survivor is re-registered (new lease) without ever leaving the view,
    the crashed worker is gone, and a worker that started during the outage shows up."""
    url = etcd.url
    survivor = Registration(url, "c3", make_info("d0"), ttl_s=_TTL_S)
    await survivor.start()
    membership = Membership(url, "c3")
    await membership.start()
    changes = membership.subscribe()
    crashing = await spawn_worker(url, "c3", make_info("d-crash"))
    await wait_until(lambda: ids(membership) == ["d-crash", "d0"], 5, "both workers")
    lease_before = survivor.lease_id
    late = Registration(url, "c3", make_info("p-late", role="prefill"), ttl_s=_TTL_S)

    etcd.pause()
    paused_at = time.monotonic()
    try:
        await wait_until(lambda: not membership.connected, 4, "disconnect noticed")
        assert ids(membership) == ["d-crash", "d0"]  # last known membership
        started = time.monotonic()
        await survivor.publish_load(WorkerLoad(running_requests=7, total_kv_blocks=128))  # must not raise
        assert time.monotonic() - started < 3
        crashing.kill()
        await crashing.wait()
        late_start = asyncio.create_task(late.start(timeout_s=15))
        await asyncio.sleep(max(0.0, _TTL_S + 2.5 - (time.monotonic() - paused_at)))
        assert ids(membership) == ["d-crash", "d0"] and not late_start.done()
    finally:
        etcd.resume()
        if crashing.returncode is None:
            crashing.kill()
            await crashing.wait()
    outage_s = time.monotonic() - paused_at
    assert outage_s < 8

    await asyncio.wait_for(late_start, 10)
    await wait_until(lambda: survivor.lease_id not in (None, lease_before), 6, "re-registration")
    await wait_until(lambda: membership.connected and ids(membership) == ["d0", "p-late"]
                     and load_field(membership, "d0", "running_requests") == 7,
                     10, "healed membership")  # the crashed worker goes after the rejoin grace
    assert await key_lease(url, b"/tandem/c3/workers/decode/d0") == survivor.lease_id
    got = [changes.get_nowait() for _ in range(changes.qsize())]
    assert MembershipChange("removed", make_info("d-crash")) in got
    # The survivor's lease expired too, but it rejoined within the grace: no flapping.
    assert [c for c in got if c.worker.worker_id == "d0"] == []
    assert MembershipChange("added", make_info("p-late", role="prefill")) in got

    for closable in (late, survivor, membership):
        await closable.close()


@pytest.mark.asyncio
async def test_short_outage_keeps_lease(etcd):
    """A pause shorter than the TTL: the same lease survives, nothing drops out."""
    survivor = Registration(etcd.url, "c4", make_info("d0"), ttl_s=4)
    await survivor.start()
    membership = Membership(etcd.url, "c4")
    await membership.start()
    changes = membership.subscribe()
    lease_before = survivor.lease_id
    etcd.pause()
    try:
        publishing = asyncio.create_task(survivor.publish_load(WorkerLoad(waiting_requests=2)))
        await asyncio.sleep(1.0)
    finally:
        etcd.resume()
    await publishing
    await wait_until(lambda: membership.connected and survivor.lease_id is not None, 6, "reconnect")
    await wait_until(lambda: load_field(membership, "d0", "waiting_requests") == 2, 6, "load after outage")
    assert survivor.lease_id == lease_before
    assert ids(membership) == ["d0"] and changes.empty()
    await survivor.close()
    await membership.close()


@pytest.mark.asyncio
async def test_etcd_restart_membership_and_registration_recover(etcd):
    survivor = Registration(etcd.url, "c5", make_info("d0"), ttl_s=_TTL_S)
    await survivor.start()
    membership = Membership(etcd.url, "c5")
    await membership.start()
    await wait_until(lambda: ids(membership) == ["d0"], 5, "registered")

    await asyncio.to_thread(etcd.stop)
    await wait_until(lambda: not membership.connected, 4, "disconnect noticed")
    await survivor.publish_load(WorkerLoad(running_requests=1))  # must not raise
    assert ids(membership) == ["d0"]
    await asyncio.to_thread(etcd.start)

    await wait_until(lambda: membership.connected, 8, "reconnected")
    newcomer = Registration(etcd.url, "c5", make_info("d1"), ttl_s=_TTL_S)
    await newcomer.start()
    await wait_until(lambda: ids(membership) == ["d0", "d1"], 5, "watch works again")
    await wait_until(lambda: survivor.lease_id is not None, 5, "survivor registered")
    await asyncio.sleep(_TTL_S + 1)  # survivor's lease is being kept alive after the restart
    assert ids(membership) == ["d0", "d1"]
    assert await key_lease(etcd.url, b"/tandem/c5/workers/decode/d0") == survivor.lease_id
    for closable in (newcomer, survivor, membership):
        await closable.close()


@pytest.mark.asyncio
async def test_unreachable_etcd_at_startup_is_a_clear_error():
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match="not reachable within 1.0 s"):
        await Registration(url, "c6", make_info("d0")).start(timeout_s=1.0)
    with pytest.raises(RegistryUnavailableError, match="not reachable"):
        await Membership(url, "c6").start(timeout_s=1.0)
    with pytest.raises(RegistryUnavailableError, match="not reachable"):
        await read_cluster(url, "c6", timeout_s=1.0)
    assert time.monotonic() - started < 6
    with pytest.raises(ValueError):
        Membership("https://127.0.0.1:2379", "c6")


@pytest.mark.asyncio
async def test_a_call_that_finishes_as_its_task_is_cancelled_still_stops_the_task():
    """Python 3.11's wait_for hands back the result of a call that completed in the same turn as
    the task's cancellation; a registry loop awaiting only such calls then never stopped."""
    call: asyncio.Future = asyncio.get_running_loop().create_future()
    probes = 0

    async def follow() -> None:  # as Membership._follow: probe, wait, probe ...
        nonlocal probes
        while True:
            await _bounded(call if probes == 0 else asyncio.sleep(0, result=1))
            probes += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)  # the task now awaits the call
    asyncio.get_running_loop().call_soon(lambda: (call.set_result(1), task.cancel()))
    done, _ = await asyncio.wait({task}, timeout=2)
    assert done and task.cancelled(), f"the task went on ({probes} more probes)"
