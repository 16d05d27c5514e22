"""``sdcache replicas``: the replica policy, and per-directory overrides of it.

``sdcache replicas`` lists the default (``sdcache meta --replicas N``) and
every override; ``sdcache replicas PATH`` says how many copies the files under
PATH get; ``sdcache replicas PATH N`` sets it (``default`` drops the
override). A change applies to new opens at once and the metadata service
re-makes or trims copies from the nodes that hold them (sdcache/meta/repair.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import errors, tls
from .placement import MAX_REPLICAS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meta", metavar="HOST:PORT", default=argparse.SUPPRESS,
                        help="metadata service (default: $SDCACHE_META, else 127.0.0.1:7070)")
    tls.add_arguments(parser, suppress=True)
    parser.add_argument("path", nargs="?", default="", help="cache directory or file (default: list the policy)")
    parser.add_argument("replicas", nargs="?", default=None,
                        help=f"copies of each chunk, 1-{MAX_REPLICAS}, or 'default' to drop the override")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary")


def _count(value: str) -> int:
    if value == "default":
        return 0
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_REPLICAS:
        raise errors.InvalidArgument(f"replicas must be a whole number from 1 to {MAX_REPLICAS} or 'default', "
                                     f"not {value!r}")
    return n


def main(args: argparse.Namespace) -> int:
    from .client.metaclient import shared_client
    from .tls import Credentials

    meta = shared_client(getattr(args, "meta", None), Credentials.from_args(args))
    if args.replicas is not None:
        if not args.path:
            raise errors.InvalidArgument("sdcache replicas PATH N: give the path")
        reply = meta.set_replicas(args.path, _count(args.replicas))
    else:
        reply = meta.replicas(args.path)
    if reply.warning:
        print(f"sdcache: warning: {reply.warning}", file=sys.stderr)
    doc = {"default": reply.default_replicas, "overrides": {r.path: r.replicas for r in reply.overrides},
           "live_nodes": reply.live_nodes, "live_zones": reply.live_zones}
    if reply.path:
        doc.update(path=reply.path, replicas=reply.replicas)
    if args.json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    elif not args.quiet:
        if reply.path:
            print(f"{reply.path}: {reply.replicas} replica{'s' if reply.replicas != 1 else ''}")
        else:
            print(f"default: {reply.default_replicas}")
            for r in reply.overrides:
                print(f"{r.path}: {r.replicas}")
        print(f"({reply.live_nodes} live node{'s' if reply.live_nodes != 1 else ''} in "
              f"{reply.live_zones} zone{'s' if reply.live_zones != 1 else ''})", file=sys.stderr)
    return 0
