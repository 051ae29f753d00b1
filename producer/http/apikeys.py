"""The front's own API keys: `sk-llmq-...`, stored only as a hash, each naming one caller.

A key is 32 random bytes (256 bits) from `secrets`, shown once when created. SQL keeps its
sha256: slow password hashes (bcrypt, argon2) exist to make guessing a low-entropy secret
expensive; nobody guesses 256 random bits, so a fast hash is as safe here and lets each
lookup be one indexed equality on the hash (never a comparison on the secret itself).

The key's name is the caller: the front writes it into `metadata["caller"]` of every job
it submits (replacing anything the body said), so usage rows, budgets and `llmq usage --by
caller` carry it. A key may have a requests/min limit, a daily USD budget and a list of
models; revoking keeps the row (its usage stays attributed) and the name taken.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from llmq.contract.schema import api_keys_table
from llmq.worker.limiter.callers import CallerLimits

KEY_PREFIX = "sk-llmq-"
#: Characters of a key kept in clear to tell keys apart in `llmq keys list` (prefix + 4).
SHOWN_CHARS = len(KEY_PREFIX) + 4
KEY_BYTES = 32
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyRefusedError(ValueError):
    """A key that cannot be created or revoked; the message says why and what to do."""


@dataclass(frozen=True)
class APIKey:
    name: str
    key_prefix: str
    daily_usd: Decimal | None
    requests_per_minute: int | None
    #: None: every model.
    models: tuple[str, ...] | None
    created_at: datetime
    revoked_at: datetime | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def limits(self) -> CallerLimits:
        return CallerLimits(self.name, self.requests_per_minute, self.daily_usd)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "key": self.key_prefix + "...",
            "daily_usd": None if self.daily_usd is None else float(self.daily_usd),
            "rpm": self.requests_per_minute, "models": list(self.models) if self.models is not None else None,
            "created_at": self.created_at.isoformat(timespec="seconds"),
            "revoked_at": self.revoked_at.isoformat(timespec="seconds") if self.revoked_at else None,
        }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and len(value) < 200


class KeyStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(
        self, name: str, *, daily_usd: float | None = None, requests_per_minute: int | None = None,
        models: list[str] | None = None,
    ) -> tuple[APIKey, str]:
        """A new key for `name`: returns its record and the key itself (shown once, never stored)."""
        if not NAME_PATTERN.match(name):
            raise KeyRefusedError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if daily_usd is not None and daily_usd < 0:
            raise KeyRefusedError(f"--daily-usd must be 0 or more (got {daily_usd})")
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise KeyRefusedError(f"--rpm must be a positive number of requests per minute (got {requests_per_minute})")
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
        row = {
            "name": name, "key_hash": hash_key(key), "key_prefix": key[:SHOWN_CHARS],
            "daily_usd": None if daily_usd is None else Decimal(str(daily_usd)),
            "requests_per_minute": requests_per_minute, "models": sorted(set(models)) if models else None,
            "created_at": datetime.now(UTC),
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(api_keys_table).values(**row))
        except IntegrityError:
            raise KeyRefusedError(f"a key named {name!r} exists (revoked keys keep their name); choose another name") from None
        return _record(row), key

    def list(self) -> list[APIKey]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(api_keys_table).order_by(api_keys_table.c.created_at)).mappings().all()
        return [_record(row) for row in rows]

    def revoke(self, name: str) -> APIKey:
        with self.engine.begin() as connection:
            done = connection.execute(
                update(api_keys_table)
                .where(api_keys_table.c.name == name, api_keys_table.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            row = connection.execute(select(api_keys_table).where(api_keys_table.c.name == name)).mappings().first()
        if row is None:
            raise KeyRefusedError(f"no key named {name!r}; `llmq keys list` shows them")
        if not done.rowcount:
            raise KeyRefusedError(f"key {name!r} was already revoked")
        return _record(row)

    def find(self, key: str) -> APIKey | None:
        """The live key this secret is, or None (unknown or revoked)."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(api_keys_table).where(api_keys_table.c.key_hash == hash_key(key), api_keys_table.c.revoked_at.is_(None))
            ).mappings().first()
        return None if row is None else _record(row)


def _record(row: Any) -> APIKey:
    models = row["models"]
    return APIKey(
        name=row["name"], key_prefix=row["key_prefix"], daily_usd=row["daily_usd"],
        requests_per_minute=row["requests_per_minute"], models=tuple(models) if models is not None else None,
        created_at=row["created_at"], revoked_at=row.get("revoked_at"),
    )
