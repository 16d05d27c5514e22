"""Write this pod's host zone (the Node's ``topology.kubernetes.io/zone`` label) to a file.

The downward API gives a pod its node's name but not the node's labels, so
the initContainer of every sdcache node pod reads its own Node object from
the API server with a ServiceAccount token that may ``get nodes``, and
writes the zone to the file named on the command line (empty when the host
has no zone label). The node container reads that file. Standard library
only: it runs in the sdcache image before anything else.

    NODE_NAME=$(spec.nodeName) python node_zone.py /var/run/sdcache/zone

Environment: ``NODE_NAME`` (required), ``KUBERNETES_SERVICE_HOST`` and
``KUBERNETES_SERVICE_PORT`` (set in every pod), ``KUBE_API_DIR`` (default
``/var/run/secrets/sdcache/kube-api``: ``token`` and ``ca.crt``). Exits 0
once the file is written, 1 with one line when the API cannot be asked.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

ZONE_LABEL = "topology.kubernetes.io/zone"
API_DIR = "/var/run/secrets/sdcache/kube-api"
TIMEOUT = 10.0  # seconds for the one API call


def node_url(env: dict[str, str]) -> str:
    """The API URL of the Node named ``$NODE_NAME``."""
    host = env.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = env.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    name = urllib.parse.quote(env["NODE_NAME"], safe="")
    return f"https://{host}:{port}/api/v1/nodes/{name}"


def read_zone(env: dict[str, str]) -> str:
    """The zone label of ``$NODE_NAME`` ("" when unset), asked of the API server."""
    api_dir = env.get("KUBE_API_DIR", API_DIR)
    with open(os.path.join(api_dir, "token"), encoding="utf-8") as f:
        token = f.read().strip()
    context = ssl.create_default_context(cafile=os.path.join(api_dir, "ca.crt"))
    request = urllib.request.Request(node_url(env), headers={"Authorization": f"Bearer {token}",
                                                             "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as reply:
        node = json.load(reply)
    return str(node.get("metadata", {}).get("labels", {}).get(ZONE_LABEL, ""))


def write_file(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n" if text else "")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not os.environ.get("NODE_NAME"):
        print("usage: NODE_NAME=NAME node_zone.py OUTPUT_FILE", file=sys.stderr)
        return 2
    node = os.environ["NODE_NAME"]
    try:
        zone = read_zone(dict(os.environ))
    except urllib.error.HTTPError as exc:
        hint = " (may its ServiceAccount get nodes? see node-rbac.yaml)" if exc.code == 403 else ""
        print(f"node_zone: reading Node {node}: HTTP {exc.code} {exc.reason}{hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # URLError, a missing token, a reply that is not JSON
        print(f"node_zone: reading Node {node}: {exc}", file=sys.stderr)
        return 1
    write_file(argv[1], zone)
    if zone:
        print(f"node_zone: {node} is in zone {zone}")
    else:
        print(f"node_zone: {node} has no {ZONE_LABEL} label; no zone", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
