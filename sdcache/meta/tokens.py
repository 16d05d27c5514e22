"""The metadata service's token authority: issue, list, revoke, and publish.

It holds the signing key (``--token-key FILE``, default ``DATA/token.key``),
records every token it issues in the store (name, role, times; never the
token), keeps the verifier the gRPC interceptor checks calls with, and tells
nodes what they need to check tokens themselves (:meth:`state`).
"""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import auth
from ..errors import AlreadyExists, InvalidArgument
from ..store.base import MetaStore, TokenRecord

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
KEY_FILE = "token.key"
SERVICE_TOKEN_TTL = 3600.0  # the service's own token for calls to nodes
SERVICE_TOKEN_RENEW = 600.0  # re-mint when less than this is left


class TokenAuthority:
    """Issues and checks the tokens of one cluster."""

    def __init__(self, store: MetaStore, key: Ed25519PrivateKey, *, enabled: bool = True) -> None:
        self.store = store
        self.key = key
        self.enabled = enabled
        self.generation = store.auth_generation()  # of the revocations the verifier holds
        self.verifier = auth.TokenVerifier([key.public_key()], self._revoked(), enabled=enabled)
        self._service_token = ""
        self._service_expires = 0.0

    @classmethod
    def open(cls, store: MetaStore, data_dir: Path, key_file: str | None, *, enabled: bool) -> TokenAuthority:
        path = Path(key_file) if key_file else data_dir / KEY_FILE
        key, created = auth.load_or_create_key(path)
        if created:
            log.warning("created token signing key %s (mode 0600); keep it secret", path)
        return cls(store, key, enabled=enabled)

    def _revoked(self) -> dict[str, float]:
        return {t.name: t.revoked for t in self.store.list_tokens() if t.revoked}

    def bootstrap(self, data_dir: Path) -> Path | None:
        """Write ``DATA/admin.token`` (0600) on the first start, when no token was ever issued.

        Returns the path written, else None. Blocking. Of several services
        starting at once over one empty store, one issues it; the others find
        the name taken and write nothing.
        """
        path = data_dir / ADMIN_TOKEN_FILE
        if not self.enabled or path.exists() or self.store.list_tokens():
            return None
        try:
            token, _ = self.create("admin", "admin")
        except AlreadyExists:
            return None
        auth.write_secret(path, (token + "\n").encode())
        return path

    def create(self, name: str, role: str, ttl: float = 0.0) -> tuple[str, TokenRecord]:
        """Issue a token (blocking: records it in the store first)."""
        auth.check_role(role)
        if ttl < 0:
            raise InvalidArgument("ttl must be 0 (never expires) or positive")
        name = auth.check_name(name or f"{role}-{secrets.token_hex(4)}")
        issued = int(time.time())
        token = auth.mint(self.key, name, role, ttl=ttl, now=issued)
        record = TokenRecord(name, role, float(issued), float(auth.expiry(issued, ttl)), 0.0)
        self.store.add_token(record)
        log.info("issued %s token %r", role, name)
        return token, record

    def revoke(self, name: str) -> TokenRecord:
        """Revoke every token named *name*; effective here at once (blocking)."""
        if not name or len(name) > 64:
            raise InvalidArgument("revoke needs a token name")
        if name == auth.SERVICE_NAME:
            # Revoking it would make every node refuse this service's warm-up and
            # eviction calls until the service re-mints its token (up to an hour).
            raise InvalidArgument(f"{name!r} is the metadata service's own token for its calls to nodes and "
                                  "cannot be revoked; a new --token-key retires every token")
        record = self.store.revoke_token(name, float(int(time.time())))
        self.reload()
        log.info("revoked token %r", name)
        return record

    def reload(self) -> None:
        """Re-read revocations from the store (another service over the same store may have revoked)."""
        generation = self.store.auth_generation()
        self.verifier.update([self.key.public_key()], self._revoked(), enabled=self.enabled)
        self.generation = generation

    def follow(self, generation: int) -> None:
        """Reload if the store's auth generation moved past what this service holds (blocking)."""
        if generation != self.generation:
            self.reload()

    def service_token(self) -> str:
        """An admin token for this service's own calls to nodes; re-minted before it expires."""
        now = time.time()
        if now > self._service_expires - SERVICE_TOKEN_RENEW:
            self._service_token = auth.mint(self.key, auth.SERVICE_NAME, "admin", ttl=SERVICE_TOKEN_TTL, now=now)
            self._service_expires = now + SERVICE_TOKEN_TTL
        return self._service_token

    def public_keys(self) -> list[bytes]:
        return [auth.public_bytes(self.key.public_key())]
