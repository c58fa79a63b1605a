"""Two listeners on one port only when both ask for it (SO_REUSEPORT): the processes of one
router share their ports; anything else binding a port in use fails."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.supervisor import PortUnavailableError, reserve_port
from services.common.rpc import SERVER_OPTIONS, SHARED_PORT_SERVER_OPTIONS, new_server

_HOST = "127.0.0.1"


async def _stop(*servers: grpc.aio.Server) -> None:
    await asyncio.gather(*(s.stop(None) for s in servers))


def test_a_grpc_port_in_use_is_refused_unless_both_servers_share_it():
    async def main():
        first, port, _ = new_server(_HOST, 0)
        await first.start()
        with pytest.raises(OSError, match=f"cannot bind gRPC to {_HOST}:{port}"):
            new_server(_HOST, port)
        with pytest.raises(OSError):  # the first did not ask to share
            new_server(_HOST, port, SHARED_PORT_SERVER_OPTIONS)

        a, shared_port, _ = new_server(_HOST, 0, SHARED_PORT_SERVER_OPTIONS)
        b, same_port, health = new_server(_HOST, shared_port, SHARED_PORT_SERVER_OPTIONS)
        assert same_port == shared_port
        with pytest.raises(OSError):  # a third that does not share
            new_server(_HOST, shared_port, SERVER_OPTIONS)
        await a.start()  # both serve: the kernel may hand the connection below to either
        await b.start()
        async with grpc.aio.insecure_channel(f"{_HOST}:{shared_port}") as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await _stop(first, a, b)

    asyncio.run(main())


def test_a_reserved_port_takes_only_listeners_that_share_it():
    async def main():
        reservation = reserve_port(_HOST, 0)
        port = reservation.getsockname()[1]
        try:
            a, _, _ = new_server(_HOST, port, SHARED_PORT_SERVER_OPTIONS)
            b, _, _ = new_server(_HOST, port, SHARED_PORT_SERVER_OPTIONS)
            with pytest.raises(OSError):
                new_server(_HOST, port)
            with pytest.raises(PortUnavailableError):  # another router's supervisor
                reserve_port(_HOST, port)
            await _stop(a, b)

            runners = [web.AppRunner(web.Application()) for _ in range(3)]
            for r in runners:
                await r.setup()
            for r in runners[:2]:
                await web.TCPSite(r, _HOST, port, reuse_port=True).start()
            with pytest.raises(OSError):
                await web.TCPSite(runners[2], _HOST, port).start()
            for r in runners:
                await r.cleanup()
        finally:
            reservation.close()

    asyncio.run(main())


def test_reserving_a_port_something_listens_on_fails():
    with socket.socket() as listener:
        listener.bind((_HOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortUnavailableError, match=f"cannot listen on {_HOST}:{port}"):
            reserve_port(_HOST, port)
