"""The databases the store tests run on: a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pg import PostgresServer


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_schema("store")
