"""Bearer tokens: their format, roles, signing and checking (pure core).

A token is ``sdc1.<payload>.<signature>``: *payload* is base64url of compact
JSON ``{"kid", "n", "r", "iat", "exp"}`` (key id, name, role, issued, expires;
``exp`` 0 = never) and *signature* is base64url of the Ed25519 signature of
``sdc1.<payload>``. The metadata service holds the private key; nodes get only
the public key (``AuthState``), so they check every request themselves, with
no call per chunk, and a node that is broken into cannot mint tokens.

Revocation is by name: the service keeps, for each revoked name, when it was
revoked, and a token of that name issued no later than that is refused. The
service refuses it at once; nodes learn of it at their next heartbeat (the
heartbeat reply carries ``auth_generation``), so a revoked token stops working
everywhere within one heartbeat interval plus one RPC (default 1 s + RTT;
``docs/SECURITY.md`` states the bound).

Roles (contract): ``read`` < ``node`` < ``admin``; a role may do everything
the roles below it may. :data:`METHOD_ROLES` and :data:`HTTP_ROLES` say what
each gRPC method and node HTTP route needs; anything not listed is refused.

Where a process finds its token (contract): ``--token-file FILE``, else
``$SDCACHE_TOKEN`` (the token itself), else ``$SDCACHE_TOKEN_FILE``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import InvalidArgument, PermissionDenied, SdcacheError, Unauthenticated

PREFIX = "sdc1"
ROLES = ("read", "node", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}
MAX_TOKEN_LEN = 1024  # bytes: a longer Authorization value is refused unparsed
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ENV_TOKEN = "SDCACHE_TOKEN"
ENV_TOKEN_FILE = "SDCACHE_TOKEN_FILE"
#: The name the metadata service signs its own calls to nodes with; never stored.
SERVICE_NAME = "meta-service"

#: The least role each ``sdcache.v1.Meta`` method needs.
METHOD_ROLES: Mapping[str, str] = {
    "Stat": "read",
    "GetManifest": "read",
    "List": "read",
    "ListNodes": "read",
    "Stats": "read",
    "GetConfig": "read",
    "GetReplicas": "read",
    "SetReplicas": "admin",
    "RegisterNode": "node",
    "Heartbeat": "node",
    "PinnedChunks": "node",
    "AuthState": "node",
    "ReportRunner": "node",
    "ListRunners": "read",
    "Commit": "admin",
    "Delete": "admin",
    "Pin": "admin",
    "Unpin": "admin",
    "Warmup": "admin",
    "Evict": "admin",
    "CreateToken": "admin",
    "ListTokens": "admin",
    "RevokeToken": "admin",
}

#: The least role each node HTTP route needs; ``None`` = open (health checks).
HTTP_ROLES: Mapping[tuple[str, str], str | None] = {
    ("GET", "/chunks/{id}"): "read",
    ("HEAD", "/chunks/{id}"): "read",
    ("POST", "/has"): "read",
    ("GET", "/stats"): "read",
    ("GET", "/metrics"): "read",
    ("POST", "/warm"): "admin",
    ("POST", "/evict"): "admin",
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
}


#: The least role each route of ``sdcache serve`` and ``sdcache gateway`` needs (A1111's ``/sdapi/v1``);
#: ``None`` = open. Users of ``--api-auth`` (HTTP Basic, as A1111) may do everything here.
SERVE_ROLES: Mapping[tuple[str, str], str | None] = {
    ("POST", "/sdapi/v1/txt2img"): "read",
    ("POST", "/sdapi/v1/img2img"): "read",
    ("GET", "/sdapi/v1/sd-models"): "read",
    ("GET", "/sdapi/v1/loras"): "read",
    ("GET", "/sdapi/v1/samplers"): "read",
    ("GET", "/sdapi/v1/schedulers"): "read",
    ("GET", "/sdapi/v1/scripts"): "read",
    ("GET", "/sdapi/v1/options"): "read",
    ("GET", "/sdapi/v1/progress"): "read",
    ("POST", "/sdapi/v1/options"): "admin",
    ("POST", "/sdapi/v1/interrupt"): "admin",
    ("POST", "/sdapi/v1/refresh-checkpoints"): "admin",
    ("GET", "/metrics"): "read",
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
}


def allows(have: str, need: str) -> bool:
    """Whether a token of role *have* may do what needs role *need*."""
    return have in _RANK and _RANK[have] >= _RANK[need]


def check_role(role: str) -> str:
    if role not in _RANK:
        raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return role


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name == SERVICE_NAME:
        raise InvalidArgument(
            f"token name must be 1-64 of A-Z a-z 0-9 . _ @ - (starting with a letter or digit), not {name!r}"
        )
    return name


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------- keys


def key_id(public: Ed25519PublicKey) -> str:
    """A short stable id of a public key (first 8 bytes of its SHA-256, hex)."""
    return hashlib.sha256(public_bytes(public)).hexdigest()[:16]


def public_bytes(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_bytes(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidArgument(f"not a raw Ed25519 public key: {exc}") from None


def load_or_create_key(path: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, bool]:
    """The signing key in *path* (PEM, PKCS#8); created with mode 0600 if missing.

    Returns (key, created). Several metadata services over one store share
    this file (a Kubernetes Secret, say) so each accepts the others' tokens.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        write_secret(path, pem)
        return key, True
    except OSError as exc:
        raise SdcacheError(f"cannot read token signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{path} is not a PEM Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key, False


def write_secret(path: str | os.PathLike[str], data: bytes) -> None:
    """Write *data* to *path* atomically, mode 0600 from the first byte."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says of its bearer."""

    name: str
    role: str
    issued: int  # unix seconds
    expires: int  # 0 = never
    kid: str


def expiry(issued: int, ttl: float) -> int:
    """When a token issued at *issued* with lifetime *ttl* expires (whole seconds; 0 = never)."""
    return issued + max(1, int(ttl)) if ttl > 0 else 0


def mint(key: Ed25519PrivateKey, name: str, role: str, *, ttl: float = 0, now: float | None = None) -> str:
    """A new signed token for *name* with *role*, valid for *ttl* seconds (0 = forever)."""
    check_role(role)
    issued = int(now if now is not None else time.time())
    expires = expiry(issued, ttl)
    payload = {"kid": key_id(key.public_key()), "n": name, "r": role, "iat": issued, "exp": expires,
               "j": secrets.token_hex(4)}  # two tokens of one name and second differ
    body = f"{PREFIX}.{_b64(json.dumps(payload, separators=(',', ':'), sort_keys=True).encode())}"
    return f"{body}.{_b64(key.sign(body.encode()))}"


def _decode(token: str, keys: Mapping[str, Ed25519PublicKey]) -> Claims:
    """Check *token*'s form and signature; its times and revocation are the caller's."""
    if len(token) > MAX_TOKEN_LEN:
        raise Unauthenticated(f"token is longer than {MAX_TOKEN_LEN} bytes")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise Unauthenticated(f"malformed token (expected {PREFIX}.<payload>.<signature>)")
    try:
        doc = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
        claims = Claims(str(doc["n"]), str(doc["r"]), int(doc["iat"]), int(doc["exp"]), str(doc["kid"]))
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed token payload") from None
    public = keys.get(claims.kid)
    if public is None:
        raise Unauthenticated(f"token signed by unknown key {claims.kid!r} (another cluster's token?)")
    try:
        public.verify(signature, f"{parts[0]}.{parts[1]}".encode())
    except InvalidSignature:
        raise Unauthenticated("token signature does not verify (tampered with?)") from None
    if claims.role not in _RANK:
        raise Unauthenticated(f"token has unknown role {claims.role!r}")
    return claims


class TokenVerifier:
    """Checks tokens against a set of public keys and a revocation list.

    Thread-safe; :meth:`update` swaps in new keys and revocations at once.
    Signature checks are cached per token string (an Ed25519 verify is
    ~50 us, a dict hit is ~50 ns), but expiry and revocation are checked on
    every call. ``enabled=False`` (``--insecure-no-auth``) lets everything in.
    """

    CACHE = 4096

    def __init__(self, keys: Iterable[Ed25519PublicKey] = (), revoked: Mapping[str, float] | None = None,
                 *, enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self.enabled = enabled
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._revoked: dict[str, float] = {}
        self.ready = False  # False until keys arrive: a node asks the service first
        self.update(keys, revoked or {}, enabled=enabled, ready=bool(list(keys)) or not enabled)

    def update(self, keys: Iterable[Ed25519PublicKey], revoked: Mapping[str, float], *,
               enabled: bool = True, ready: bool = True) -> None:
        new_keys = {key_id(k): k for k in keys}
        with self._lock:
            if new_keys.keys() != self._keys.keys():
                self._cache.clear()
            self._keys = new_keys
            self._revoked = dict(revoked)
            self.enabled = enabled
            self.ready = ready

    def revoked(self) -> dict[str, float]:
        with self._lock:
            return dict(self._revoked)

    def verify(self, token: str | None, *, now: float | None = None) -> Claims:
        """The claims of a good token; :class:`Unauthenticated` saying why otherwise."""
        if not token:
            raise Unauthenticated("no token: send Authorization: Bearer TOKEN "
                                  "(set --token-file, $SDCACHE_TOKEN or $SDCACHE_TOKEN_FILE)")
        with self._lock:
            claims = self._cache.get(token)
            if claims is not None:
                self._cache.move_to_end(token)
            keys, revoked = self._keys, self._revoked
        if claims is None:
            claims = _decode(token, keys)
            with self._lock:
                self._cache[token] = claims
                if len(self._cache) > self.CACHE:
                    self._cache.popitem(last=False)
        t = time.time() if now is None else now
        if claims.expires and t >= claims.expires:
            raise Unauthenticated(f"token {claims.name!r} expired at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(claims.expires))} UTC")
        at = revoked.get(claims.name)
        if at is not None and claims.issued <= at:
            raise Unauthenticated(f"token {claims.name!r} was revoked")
        return claims

    def check(self, token: str | None, need: str | None) -> Claims | None:
        """Verify *token* and that its role covers *need*; None when auth is off or *need* is None."""
        if need is None or not self.enabled:
            return None
        claims = self.verify(token)
        if not allows(claims.role, need):
            raise PermissionDenied(f"token {claims.name!r} has role {claims.role!r}; this needs {need!r}")
        return claims


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` value, else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


# --------------------------------------------------------------------------- where clients find theirs


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read(MAX_TOKEN_LEN + 2).strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise InvalidArgument(f"token file {path} is empty")
    return token


def resolve_token(token_file: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """``--token-file FILE``, else ``$SDCACHE_TOKEN``, else ``$SDCACHE_TOKEN_FILE`` (contract); None if none."""
    env = os.environ if env is None else env
    if token_file:
        return read_token_file(token_file)
    if env.get(ENV_TOKEN):
        return env[ENV_TOKEN].strip()
    if env.get(ENV_TOKEN_FILE):
        return read_token_file(env[ENV_TOKEN_FILE])
    return None
