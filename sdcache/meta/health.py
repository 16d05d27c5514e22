"""The standard gRPC health service (``grpc.health.v1``) of the metadata service, and a probe for it.

:func:`add_health` registers the service on a server, and the server reports
SERVING for the whole server (``""``) and for ``sdcache.v1.Meta`` once it
listens, and NOT_SERVING when it starts to shut down, so open ``Watch``
streams see it go before the port closes. The auth interceptor leaves
``/grpc.health.v1.Health/`` open (:data:`sdcache.meta.grpcauth.OPEN_PREFIXES`):
probes carry no token, and the answer says nothing but up or down.

Kubernetes' ``grpc:`` probe speaks plaintext only. A service with TLS is
probed with ``python -m sdcache.meta.health --tls-ca CA ADDRESS`` instead
(an ``exec:`` probe): it exits 0 when the service answers SERVING, 1 with one
line otherwise.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import tls
from .._proto import meta_pb2

#: The service name of the metadata API, as health checks name it.
META_SERVICE = meta_pb2.DESCRIPTOR.services_by_name["Meta"].full_name
#: Every name the service reports on: the whole server, and the metadata API.
SERVICES = (health.OVERALL_HEALTH, META_SERVICE)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def add_health(server: grpc.aio.Server) -> health.aio.HealthServicer:
    """Register the health service on *server*; :func:`report` then says how the server is."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


async def report(servicer: health.aio.HealthServicer, status: int) -> None:
    """Report *status* (:data:`SERVING`, :data:`NOT_SERVING`) for every name in :data:`SERVICES`."""
    for name in SERVICES:
        await servicer.set(name, status)


async def shutting_down(servicer: health.aio.HealthServicer) -> None:
    """Report NOT_SERVING for every name, for good: the server is stopping."""
    await servicer.enter_graceful_shutdown()


def check(address: str, *, service: str = "", tls_files: tls.TlsFiles | None = None,
          server_name: str | None = None, timeout: float = 5.0) -> str:
    """The status name (``SERVING``, ``NOT_SERVING``, ...) that *address* reports for *service*.

    With *tls_files* the channel is TLS, verified against their CA;
    *server_name* is the name the certificate must carry when it is not
    *address*'s host (a probe dials ``127.0.0.1`` but the certificate names
    the Service). Raises :class:`grpc.RpcError` when the call fails.
    """
    if tls_files is None:
        channel = grpc.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=tls_files.read("ca"),
                                             private_key=tls_files.read("key"),
                                             certificate_chain=tls_files.read("cert"))
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, creds, options=options)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    """``python -m sdcache.meta.health``: 0 when the service is SERVING, 1 with one line otherwise."""
    parser = argparse.ArgumentParser(prog="python -m sdcache.meta.health",
                                     description="Ask a metadata service's grpc.health.v1 service; "
                                     "exit 0 when it answers SERVING.")
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--server-name", default=None, metavar="NAME",
                        help="name the server's certificate must carry (default: the address's host)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="give up after this long (default %(default)s)")
    parser.add_argument("--tls-ca", metavar="PEM", help="CA to verify the service with (turns TLS on)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate, for a service under mutual TLS")
    parser.add_argument("--tls-key", metavar="PEM", help="its private key")
    args = parser.parse_args(argv)
    try:
        files = tls.TlsFiles.resolve(args.tls_cert, args.tls_key, args.tls_ca, env={})
        status = check(args.address, service=args.service, tls_files=files, server_name=args.server_name,
                       timeout=args.timeout)
    except grpc.RpcError as exc:
        code = exc.code()
        detail = f"no service named {args.service!r}" if code == grpc.StatusCode.NOT_FOUND else exc.details()
        print(f"{args.address}: {code.name}: {detail}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure as one line
        print(f"{args.address}: {exc}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{args.address}: {args.service or 'server'} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
