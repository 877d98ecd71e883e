"""API tokens and webhook signatures, kept in the run store.

A token reads ``typhon_<id>_<secret>``: ``id`` names its row, ``secret`` is 32 random bytes
(base64url). The store keeps the sha256 of the secret, never the token; checking one looks the
row up by id and compares the digests in constant time. Scopes nest: ``read`` (GETs) within
``submit`` (runs, feedback, activity) within ``admin`` (approvals).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa

from typhon.errors import InputError
from typhon.store import RunStore, api_tokens, hook_signatures

__all__ = [
    "SCOPES",
    "Scope",
    "TokenInfo",
    "TokenStore",
    "allows",
    "remember_signature",
]

Scope = Literal["read", "submit", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "submit", "admin")
_TOKEN = re.compile(r"^typhon_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_TOUCH_EVERY_S = 60.0


def allows(have: str, need: Scope) -> bool:
    """Whether a token of scope ``have`` may do what needs ``need``."""
    return have in SCOPES and SCOPES.index(have) >= SCOPES.index(need)  # type: ignore[arg-type]


def _digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    scope: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "scope": self.scope,
            "created_at": _iso(self.created_at), "last_used_at": _iso(self.last_used_at),
            "revoked_at": _iso(self.revoked_at),
        }  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _info(row: Any) -> TokenInfo:
    def utc(v: datetime | None) -> datetime | None:
        return None if v is None else (v if v.tzinfo else v.replace(tzinfo=UTC))

    return TokenInfo(
        row["id"], row["name"], row["scope"], utc(row["created_at"]) or datetime.now(UTC),
        utc(row["last_used_at"]), utc(row["revoked_at"]),
    )  # fmt: skip


class TokenStore:
    """Create, list, revoke and check API tokens in ``store``."""

    def __init__(self, store: RunStore):
        self.store = store
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def create(self, scope: str, name: str = "") -> tuple[TokenInfo, str]:
        """A new token; returns its row and the token, which is shown this once."""
        if scope not in SCOPES:
            raise InputError(f"scope must be one of {', '.join(SCOPES)}, not '{scope}'")
        if len(name) > 128:
            raise InputError("the token's name is over 128 characters; shorten it")
        token_id = secrets.token_hex(6)
        secret = secrets.token_bytes(32)
        encoded = base64.urlsafe_b64encode(secret).decode().rstrip("=")
        now = datetime.now(UTC)
        self.store.migrate_once()
        with self.store.engine.begin() as conn:
            conn.execute(
                api_tokens.insert().values(
                    id=token_id, name=name, scope=scope, secret_sha256=_digest(secret),
                    created_at=now,
                )
            )  # fmt: skip
        return TokenInfo(token_id, name, scope, now), f"typhon_{token_id}_{encoded}"

    def list(self, *, include_revoked: bool = True) -> list[TokenInfo]:
        self.store.migrate_once()
        query = sa.select(api_tokens).order_by(api_tokens.c.created_at, api_tokens.c.id)
        if not include_revoked:
            query = query.where(api_tokens.c.revoked_at.is_(None))
        with self.store.engine.connect() as conn:
            return [_info(r) for r in conn.execute(query).mappings()]

    def active_count(self) -> int:
        self.store.migrate_once()
        query = sa.select(sa.func.count()).where(api_tokens.c.revoked_at.is_(None))
        with self.store.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def revoke(self, token_id: str) -> bool:
        """Revoke a token by id; False when there is no such token or it was revoked already."""
        self.store.migrate_once()
        update = (
            api_tokens.update()
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=datetime.now(UTC))
        )
        with self.store.engine.begin() as conn:
            return bool(conn.execute(update).rowcount)

    def check(self, token: str) -> TokenInfo | None:
        """The token's row when the token is valid and not revoked, else None."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        token_id, encoded = match.groups()
        try:
            secret = base64.urlsafe_b64decode(encoded + "=")
        except (binascii.Error, ValueError):
            return None
        self.store.migrate_once()
        query = sa.select(api_tokens).where(api_tokens.c.id == token_id)
        with self.store.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            hmac.compare_digest(_digest(secret), _digest(b""))  # the same work either way
            return None
        if not hmac.compare_digest(_digest(secret), str(row["secret_sha256"])):
            return None
        if row["revoked_at"] is not None:
            return None
        self._touch(token_id)
        return _info(row)

    def _touch(self, token_id: str) -> None:
        """Record when a token was last used, at most once a minute per token."""
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(token_id, -_TOUCH_EVERY_S) < _TOUCH_EVERY_S:
                return
            self._touched[token_id] = now
        update = (
            api_tokens.update()
            .where(api_tokens.c.id == token_id)
            .values(last_used_at=datetime.now(UTC))
        )
        with self.store.engine.begin() as conn:
            conn.execute(update)


def remember_signature(store: RunStore, hook: str, signature: str, expires_at: float) -> bool:
    """Record a webhook signature until ``expires_at`` (epoch seconds); False when it was seen
    before (a replay). Expired signatures are dropped on the way."""
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    stmt = (
        insert(hook_signatures)
        .values(signature=signature, hook=hook, expires_at=expires_at)
        .on_conflict_do_nothing(index_elements=[hook_signatures.c.signature])
        .returning(hook_signatures.c.signature)
    )
    store.migrate_once()
    with store.engine.begin() as conn:
        conn.execute(hook_signatures.delete().where(hook_signatures.c.expires_at < time.time()))
        return conn.execute(stmt).first() is not None
