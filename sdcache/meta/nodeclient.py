"""The metadata service's HTTP client for the node control endpoints.

It calls the node's ``POST /warm``, ``/has`` and ``/evict``; their contract
is written once, in ``node/http.py`` (:mod:`sdcache.node.http`). Every call
carries the service's own admin token (``Authorization: Bearer``), over HTTPS
when the service runs with TLS. Every failure (refused connection, timeout, non-2xx
reply, malformed JSON) becomes :class:`~sdcache.errors.Unavailable` naming
the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..errors import Unavailable
from ..tls import TlsFiles

log = logging.getLogger(__name__)

# Loading a batch may read 64 x 4 MiB from a slow under-store.
WARM_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=5)
CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)


@dataclass(slots=True)
class WarmReply:
    loaded: int = 0
    bytes: int = 0
    present: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # chunk id -> why
    no_space: int = 0


def _why(failure: dict[str, Any]) -> str:
    """``"ErrorClass: message"`` of one failed chunk of a warm reply (the node sends both)."""
    return ": ".join(str(failure[k]) for k in ("error", "message") if failure.get(k))


class NodeClient:
    """Calls the node control endpoints over one pooled aiohttp session.

    Create and close it inside the event loop that uses it.
    """

    def __init__(self, token: Callable[[], str] | None = None, tls: TlsFiles | None = None) -> None:
        self._token = token
        self._scheme = "https" if tls else "http"
        connector = aiohttp.TCPConnector(ssl=tls.client_context()) if tls else None
        self._session = aiohttp.ClientSession(raise_for_status=False, connector=connector)

    async def close(self) -> None:
        await self._session.close()

    async def _post(self, address: str, endpoint: str, body: dict[str, Any], timeout: aiohttp.ClientTimeout) -> Any:
        url = f"{self._scheme}://{address}/{endpoint}"
        headers = {"Authorization": f"Bearer {self._token()}"} if self._token else None
        try:
            async with self._session.post(url, json=body, timeout=timeout, headers=headers) as resp:
                if resp.status // 100 != 2:
                    text = (await resp.text())[:200].strip()
                    raise Unavailable(f"node {address}: {endpoint} answered HTTP {resp.status}: {text}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise Unavailable(f"node {address}: {endpoint} failed: {str(exc) or type(exc).__name__}") from exc

    async def warm(self, address: str, path: str, ids: list[str], *, peers: list[str] | None = None,
                   peers_only: bool = False) -> WarmReply:
        """Ask the node at *address* to load chunks *ids* of file *path*.

        *peers* (node ids) are asked first for the bytes; with *peers_only* the
        node reads nothing from the under-store (re-replication).
        """
        body: dict[str, Any] = {"path": path, "ids": ids}
        if peers:
            body["peers"] = peers
        if peers_only:
            body["peers_only"] = True
        data = await self._post(address, "warm", body, WARM_TIMEOUT)
        try:
            return WarmReply(
                loaded=int(data.get("loaded", 0)),
                bytes=int(data.get("bytes", 0)),
                present=int(data.get("present", 0)),
                failed={str(f["id"]): _why(f) for f in data.get("failed", ())},
                no_space=int(data.get("no_space", 0)),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise Unavailable(f"node {address}: malformed warm reply: {exc}") from exc

    async def has(self, address: str, ids: list[str]) -> set[str]:
        """Which of *ids* the node at *address* holds."""
        data = await self._post(address, "has", {"ids": ids}, CONTROL_TIMEOUT)
        try:
            return {str(i) for i in data["present"]}
        except (KeyError, TypeError) as exc:
            raise Unavailable(f"node {address}: malformed has reply: {exc}") from exc

    async def evict(self, address: str, path: str, ids: list[str]) -> tuple[int, int]:
        """Drop *ids* of file *path* from the node; ``(chunks, bytes)`` it freed."""
        data = await self._post(address, "evict", {"path": path, "ids": ids}, CONTROL_TIMEOUT)
        try:
            return int(data.get("chunks", 0)), int(data.get("bytes", 0))
        except (AttributeError, TypeError, ValueError) as exc:
            raise Unavailable(f"node {address}: malformed evict reply: {exc}") from exc
