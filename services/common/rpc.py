"""gRPC plumbing shared by every service: message conversions, error mapping, servers.

Every tandem process serves the standard ``grpc.health.v1`` service next to its own,
so `tandem up`, Kubernetes probes and the router can all ask the same question.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proto.tandem.v1 import tandem_pb2 as pb
from services.engine.errors import CapacityError, EngineError, KVFenceError
from services.engine.request import SamplingParams

log = logging.getLogger(__name__)

# Large enough for long prompts as token ids; KV never travels over gRPC.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
_BASE_SERVER_OPTIONS = CHANNEL_OPTIONS + (("grpc.http2.min_ping_interval_without_data_ms", 5_000),)
# gRPC sets SO_REUSEPORT on Linux unless told otherwise, so a second server would share a
# port in use instead of failing to bind it. Every server binds its port alone, except the
# processes of one router (router/supervisor.py), which listen on the same ports on purpose.
SERVER_OPTIONS = _BASE_SERVER_OPTIONS + (("grpc.so_reuseport", 0),)
SHARED_PORT_SERVER_OPTIONS = _BASE_SERVER_OPTIONS + (("grpc.so_reuseport", 1),)


def sampling_params(options: pb.SamplingOptions, seed: int | None = None) -> SamplingParams:
    """SamplingOptions -> SamplingParams (raises InvalidRequestError on bad values)."""
    has = options.HasField
    return SamplingParams(
        max_tokens=options.max_tokens if has("max_tokens") else None,
        temperature=options.temperature if has("temperature") else 1.0,
        top_p=options.top_p if has("top_p") else 1.0,
        top_k=options.top_k if has("top_k") else 0,
        seed=seed if seed is not None else (options.seed if has("seed") else None),
        stop=tuple(options.stop),
        stop_token_ids=tuple(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
        min_tokens=options.min_tokens,
        logprobs=options.logprobs,
    )


def status_for(error: Exception) -> grpc.StatusCode:
    if isinstance(error, KVFenceError):
        return grpc.StatusCode.FAILED_PRECONDITION  # the router retries on another pair
    if isinstance(error, CapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, (EngineError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


async def abort_with(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """End an RPC with the status that fits ``error`` (raises, as context.abort does)."""
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=error)
    await context.abort(code, str(error))


def new_server(bind_host: str, port: int, options: Sequence[tuple[str, int]] = SERVER_OPTIONS
               ) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A grpc.aio server bound to host:port (0 = any free port), with the health service.
    ``options``: SERVER_OPTIONS (the port must be free) or SHARED_PORT_SERVER_OPTIONS."""
    server = grpc.aio.server(options=options)
    try:
        bound = server.add_insecure_port(f"{bind_host}:{port}")
    except RuntimeError:  # grpc.aio raises where the sync server returns 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {bind_host}:{port} (in use?)")
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, bound, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, services: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *services):
        await health_servicer.set(name, status)


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
