"""Who may call ``serve`` and ``gateway``: bearer tokens and A1111's ``--api-auth``, in one middleware.

A request passes when it carries

* ``Authorization: Bearer TOKEN``, a cache token whose role covers the route
  (:data:`sdcache.auth.SERVE_ROLES`), checked locally against the keys and
  revocations loaded from the metadata service (:class:`~sdcache.meta.authstate.AuthFollower`, run by the registry clients), or
* ``Authorization: Basic ...`` matching a ``--api-auth user:pass`` pair, which
  is how A1111 clients (``webuiapi``'s ``set_auth``) log in; such users may do
  everything the API offers, as in A1111.

Every route is in the table; one missing from it needs ``admin``. The API's
own errors travel in A1111's shape (:func:`sdcache.serving.a1111.error_body`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sdcache import auth, errors

ENV_API_AUTH = "SDCACHE_API_AUTH"


def parse_api_auth(text: str | None) -> dict[str, str]:
    """``user:pass[,user2:pass2]`` (A1111's ``--api-auth``), else ``$SDCACHE_API_AUTH``; {} for none."""
    text = text if text is not None else os.environ.get(ENV_API_AUTH, "")
    users: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise errors.InvalidArgument("--api-auth wants user:password[,user:password...]")
        users[user] = password
    return users


class Gate:
    """Checks one request against the route table; holds the verifier and the Basic users."""

    def __init__(self, verifier: auth.TokenVerifier, users: dict[str, str]) -> None:
        self.verifier = verifier
        self.users = users

    @property
    def open(self) -> bool:
        return not self.verifier.enabled and not self.users

    def check(self, method: str, route: str, header: str | None) -> None:
        need = auth.SERVE_ROLES.get((method, route), "admin")
        if need is None:
            return
        scheme = (header or "").strip().partition(" ")[0].lower()
        if scheme == "basic":
            if self._basic_ok(header or ""):
                return
            raise errors.Unauthenticated("wrong user or password (--api-auth)")
        if self.users and not self.verifier.enabled:
            raise errors.Unauthenticated("this server needs a user and password (HTTP Basic, --api-auth)")
        if not self.verifier.enabled:
            return
        if not self.verifier.ready:
            raise errors.Unavailable("this server has not loaded its token keys from the metadata service yet")
        self.verifier.check(auth.bearer(header), need)

    def _basic_ok(self, header: str) -> bool:
        try:
            raw = base64.b64decode(header.strip().partition(" ")[2], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        user, _, password = raw.partition(":")
        want = self.users.get(user)
        # compare_digest on equal-length inputs either way: no early exit on the user's existence.
        return want is not None and hmac.compare_digest(want.encode(), password.encode())


def middleware(gate: Gate) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None:  # 404/405: aiohttp answers, nothing is read
            gate.check(request.method, resource.canonical, request.headers.get("Authorization"))
        return await handler(request)

    return check


def challenge_headers(exc: errors.SdcacheError, gate: Gate) -> dict[str, str]:
    if exc.http_status != 401:
        return {}
    return {"WWW-Authenticate": 'Basic realm="sdcache"' if gate.users else 'Bearer realm="sdcache"'}


def error_response(exc: BaseException, gate: Gate | None = None) -> web.Response:
    """An error as A1111's JSON shape, with ``Retry-After`` on 429/503 and a challenge on 401."""
    from .a1111 import error_body

    status = exc.http_status if isinstance(exc, errors.SdcacheError) else 500
    headers: dict[str, Any] = {}
    if isinstance(exc, errors.SdcacheError):
        if gate is not None:
            headers.update(challenge_headers(exc, gate))
        if status in (429, 503):
            headers["Retry-After"] = str(getattr(exc, "retry_after", 1))
    return web.json_response(error_body(exc, status), status=status, headers=headers)
