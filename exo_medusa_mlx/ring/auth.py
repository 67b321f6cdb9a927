"""Who may talk to a ring node, and whom it talks to: a shared token and the peers it was told about.

With a token (``--token`` or ``$MLX_MEDUSA_RING_TOKEN``), every RPC must carry it in
the ``ring-token`` metadata, compared in constant time; the nodes and the client send
it on every call. The token authenticates, it does not encrypt: outside loopback,
run the ring on a trusted network or through a tunnel. A node forwards only to the
addresses in its ``--peers`` (the launcher passes the ring's), never to any address
a request names.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

import grpc

TOKEN_KEY = "ring-token"  # gRPC metadata (keys are lower case)
TOKEN_ENV = "MLX_MEDUSA_RING_TOKEN"


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata a call carries (None without a token)."""
    return None if not token else ((TOKEN_KEY, token),)


def env_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every RPC whose ``ring-token`` is not the node's token."""

    def __init__(self, token: str):
        self._token = token.encode()
        self.name = "node"  # how errors name the node; set once its address is bound

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{self.name}: missing or wrong ring token (metadata '{TOKEN_KEY}')")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        given = dict(details.invocation_metadata or ()).get(TOKEN_KEY, "")
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._token):
            return await continuation(details)
        return self._deny


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_peers(text: str | None) -> frozenset[str]:
    """``host:port,host:port`` as a set of addresses (one-line ``ValueError`` on a malformed one)."""
    peers = set()
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"--peers: '{item}' is not host:port")
        peers.add(item)
    return frozenset(peers)
