"""Following the metadata service's token state from a process that checks tokens itself.

Nodes, ``serve`` and the gateway verify bearer tokens locally (no call per
request): they hold the service's public keys and its revocation list, and
reload both whenever the service's auth generation moves (reported in every
heartbeat or runner report).
"""

from __future__ import annotations

import logging

import grpc

from .. import auth
from .._proto import meta_pb2 as pb
from .._proto import meta_pb2_grpc as pbg

log = logging.getLogger(__name__)

RPC_TIMEOUT = 10.0


class AuthFollower:
    """Keeps a :class:`~sdcache.auth.TokenVerifier` in step with the metadata service's ``AuthState``."""

    def __init__(self, verifier: auth.TokenVerifier, where: str,
                 open_warning: str = "this server takes any bearer token") -> None:
        self.verifier = verifier
        self.where = where
        self.open_warning = open_warning  # what auth being off means for this process, in its log
        self.generation: int | None = None

    async def sync(self, stub: pbg.MetaStub, generation: int | None = None) -> bool:
        """Load keys and revocations unless *generation* is the one loaded (None: always); False on failure."""
        if generation is not None and generation == self.generation:
            return True
        try:
            resp = await stub.AuthState(pb.AuthStateRequest(), timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            log.warning("cannot load token state from %s (%s: %s); will retry", self.where, e.code().name,
                        e.details())
            return False
        keys = [auth.public_from_bytes(k) for k in resp.public_keys]
        self.verifier.update(keys, {t.name: t.revoked for t in resp.revoked}, enabled=resp.enabled)
        if not resp.enabled and self.generation is None:
            log.warning("the metadata service runs with --insecure-no-auth: %s", self.open_warning)
        self.generation = resp.generation
        return True
