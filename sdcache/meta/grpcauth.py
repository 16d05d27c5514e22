"""Auth and TLS on gRPC, in one place per side.

Server: :class:`AuthInterceptor` checks the ``authorization`` metadata of every
call against :data:`sdcache.auth.METHOD_ROLES` before any handler runs; a
handler never sees a token. A method missing from the table is refused
(fail closed), except the standard health service. A refused call's request
is never decoded; an admitted one that is not a valid message is
INVALID_ARGUMENT (not gRPC's UNKNOWN plus a logged traceback per call).

Client: :func:`channel` / :func:`aio_channel` open a plain or TLS channel for
:class:`~sdcache.tls.Credentials` whose interceptor adds the ``authorization``
metadata to every call, so no call site can forget it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from .. import auth, errors
from ..tls import Credentials, TlsFiles
from . import convert

log = logging.getLogger(__name__)

SERVICE = "/sdcache.v1.Meta/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
MAX_MESSAGE = 64 << 20  # a listing page or a commit of a very large file


def _deny(handler: grpc.RpcMethodHandler, exc: errors.SdcacheError) -> grpc.RpcMethodHandler:
    """A handler of *handler*'s shape that only answers *exc*'s status.

    It never parses the request: bytes from a caller who is not let in are
    not even decoded.
    """
    code, details, trailer = convert.status_of(exc)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details, trailing_metadata=trailer)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details, trailing_metadata=trailer)
        yield  # pragma: no cover - abort raises

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """*handler*, decoding its request itself: bytes that are no message are INVALID_ARGUMENT.

    gRPC's own decoding would answer UNKNOWN ("Unexpected DecodeError") and
    log a traceback for every such call. Handlers are asyncio ones (a
    coroutine, or an async generator for a response stream), as
    :class:`~sdcache.meta.servicer.MetaServicer`'s are; streaming requests
    keep gRPC's decoding.
    """
    parse = handler.request_deserializer
    if parse is None or not (handler.unary_unary or handler.unary_stream):
        return handler

    async def request(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a parser raises
            bad = errors.InvalidArgument(f"malformed request ({len(raw)} bytes): {type(exc).__name__}: {exc}")
            code, details, trailer = convert.status_of(bad)
            await context.abort(code, details, trailing_metadata=trailer)

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        behaviour = handler.unary_unary

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await behaviour(await request(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    streaming = handler.unary_stream

    async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        async for item in streaming(await request(raw, context), context):
            yield item

    return grpc.unary_stream_rpc_method_handler(stream, **kw)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose bearer token is missing, bad, or of too low a role."""

    def __init__(self, verifier: auth.TokenVerifier) -> None:
        self.verifier = verifier
        self._parsing: dict[str, grpc.RpcMethodHandler] = {}  # method -> its handler under _parsing

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        need = auth.METHOD_ROLES.get(method[len(SERVICE):]) if method.startswith(SERVICE) else None
        try:
            if need is None:
                raise errors.PermissionDenied(f"method {method} is not open to any role")
            token = None
            for key, value in details.invocation_metadata or ():
                if key == "authorization":
                    token = auth.bearer(value if isinstance(value, str) else value.decode("latin-1"))
                    break
            self.verifier.check(token, need)
        except errors.SdcacheError as exc:
            log.info("refused %s: %s", method, exc, extra={"method": method})
            from . import metrics  # here: only the metadata service runs this interceptor

            metrics.RPC_ERRORS.labels(method.rsplit("/", 1)[-1], exc.grpc_code).inc()
            return _deny(handler, exc)
        wrapped = self._parsing.get(method)
        if wrapped is None:
            wrapped = self._parsing[method] = _parsing(handler)
        return wrapped


# --------------------------------------------------------------------------- clients


def call_metadata(creds: Credentials) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {creds.token}"),) if creds.token else ()


class _Details(
    collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                        "compression")),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, d: grpc.ClientCallDetails) -> _Details:
        return _Details(d.method, d.timeout, (*(d.metadata or ()), *self.metadata), d.credentials,
                        getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)


class _AioTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the bearer token to every call of an asyncio channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*(d.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)

    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._details(details), request)


def _channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls.read("ca"), private_key=tls.read("key"),
                                        certificate_chain=tls.read("cert"))


_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Reconnect within a second of a restarted service coming back (gRPC's default
    # backoff grows to minutes; callers that wait for it would wait that long).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def channel(address: str, creds: Credentials) -> grpc.Channel:
    """A blocking channel to *address* that sends *creds*' token, TLS when *creds* has TLS files."""
    if creds.tls:
        ch = grpc.secure_channel(address, _channel_credentials(creds.tls), options=_OPTIONS)
    else:
        ch = grpc.insecure_channel(address, options=_OPTIONS)
    md = call_metadata(creds)
    return grpc.intercept_channel(ch, _TokenInterceptor(md)) if md else ch


def aio_channel(address: str, creds: Credentials) -> grpc.aio.Channel:
    """An asyncio channel to *address* that sends *creds*' token, TLS when *creds* has TLS files."""
    md = call_metadata(creds)
    interceptors = [_AioTokenInterceptor(md)] if md else None
    if creds.tls:
        return grpc.aio.secure_channel(address, _channel_credentials(creds.tls), options=_OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=_OPTIONS, interceptors=interceptors)


def add_port(server: grpc.aio.Server, listen: str, tls: TlsFiles | None, *, require_client_cert: bool) -> int:
    """Bind *listen* on *server*, TLS when *tls* is given; returns the port (0 = failed)."""
    if tls is None:
        return server.add_insecure_port(listen)
    if not tls.cert:
        raise errors.InvalidArgument("a TLS server needs --tls-cert and --tls-key")
    if require_client_cert and not tls.ca:
        raise errors.InvalidArgument("--tls-require-client-cert needs --tls-ca to verify clients with")
    creds = grpc.ssl_server_credentials([(tls.read("key"), tls.read("cert"))],
                                        root_certificates=tls.read("ca") if require_client_cert else None,
                                        require_client_auth=require_client_cert)
    return server.add_secure_port(listen, creds)
