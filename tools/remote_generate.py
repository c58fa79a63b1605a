"""``tandem generate --url``: a completion from a running router, streamed to stdout.

``--url http://host:port`` goes through the OpenAI-compatible HTTP API (server-sent
events); ``--url host:port`` or ``grpc://host:port`` through the gRPC API.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import grpc

from router.client import Client, Delta

_HTTP_TIMEOUT_S = 600


class RemoteError(Exception):
    """The router refused the request or could not be reached; the message says why."""


def generate_remote(url: str, prompt: str, sampling: dict, out=sys.stdout) -> None:
    if url.startswith(("http://", "https://")):
        _via_http(url.rstrip("/"), prompt, sampling, out)
    else:
        _via_grpc(url.removeprefix("grpc://"), prompt, sampling, out)


def _via_grpc(address: str, prompt: str, sampling: dict, out) -> None:
    try:
        with Client(address) as client:
            for item in client.stream(prompt, **sampling):
                if isinstance(item, Delta):
                    out.write(item.text)
                    out.flush()
    except grpc.RpcError as e:
        raise RemoteError(f"{e.code().name}: {e.details()}") from None


def _via_http(base: str, prompt: str, sampling: dict, out) -> None:
    body = {"prompt": prompt, "stream": True, **sampling}
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_S) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[5:]).get("choices") or []
                if choices:
                    out.write(choices[0].get("text", ""))
                    out.flush()
    except urllib.error.HTTPError as e:
        raise RemoteError(f"HTTP {e.code}: {_error_message(e.read())}") from None
    except urllib.error.URLError as e:
        raise RemoteError(f"cannot reach {base}: {e.reason}") from None


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:500]
