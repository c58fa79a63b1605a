"""The prefill worker's bound on exported KV in flight: first come, first served, a prompt
larger than the room runs alone, and a waiter that leaves gives its place up."""

from __future__ import annotations

import asyncio

import pytest

from services.prefill.handoff_room import HandoffRoom


async def _holder(room: HandoffRoom, nbytes: int, order: list[str], name: str, release: asyncio.Event) -> None:
    async with room.hold(nbytes):
        order.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_prompts_wait_in_order_for_room_and_a_large_one_runs_alone():
    room = HandoffRoom(100)
    order: list[str] = []
    gates = {name: asyncio.Event() for name in "abcd"}
    tasks = [asyncio.create_task(_holder(room, 60, order, "a", gates["a"]))]
    await _settle()
    tasks.append(asyncio.create_task(_holder(room, 250, order, "b", gates["b"])))  # larger than the room
    await _settle()
    tasks.append(asyncio.create_task(_holder(room, 10, order, "c", gates["c"])))  # fits, but b came first
    await _settle()
    assert order == ["a"] and room.waiting == 2 and room.in_use_bytes == 60
    gates["a"].set()
    await _settle()
    assert order == ["a", "b"] and room.in_use_bytes == 250  # alone: nothing else in flight
    gates["b"].set()
    await _settle()
    assert order == ["a", "b", "c"] and room.waiting == 0
    gates["c"].set()
    await asyncio.gather(*tasks)
    assert room.in_use_bytes == 0


@pytest.mark.asyncio
async def test_a_waiter_that_leaves_lets_the_next_one_in():
    room = HandoffRoom(100)
    order: list[str] = []
    gates = {name: asyncio.Event() for name in "abc"}
    a = asyncio.create_task(_holder(room, 50, order, "a", gates["a"]))
    await _settle()
    b = asyncio.create_task(_holder(room, 80, order, "b", gates["b"]))  # must wait for a
    await _settle()
    c = asyncio.create_task(_holder(room, 40, order, "c", gates["c"]))  # fits beside a, queued behind b
    await _settle()
    assert order == ["a"] and room.waiting == 2
    b.cancel()  # the client left
    await _settle()
    assert order == ["a", "c"] and room.in_use_bytes == 90 and room.waiting == 0
    for gate in gates.values():
        gate.set()
    await asyncio.gather(a, c)
    assert room.in_use_bytes == 0
    with pytest.raises(ValueError, match="must be > 0"):
        HandoffRoom(0)
