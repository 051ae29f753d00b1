"""Files and OpenAI-style batch records in SQL (`llmq_files`, `llmq_openai_batches`).

Each belongs to the key that made it (its `owner`, the key's name): another key is told
404, as if it did not exist. A batch's output and error files are written once, when the
batch is first read after its last job ended, and its counts kept beside them, so both
stay readable after Redis forgets the batch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from llmq.contract.schema import files_table, openai_batches_table

#: OpenAI's file ids look like `file-...`; ours are `file-<32 hex>`.
FILE_ID_PREFIX = "file-"


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    owner: str
    purpose: str
    filename: str
    size_bytes: int
    created_at: datetime


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    owner: str
    input_file_id: str
    endpoint: str
    completion_window: str
    lane: str
    metadata: dict[str, str] | None
    errors: list[dict[str, Any]] | None
    request_counts: dict[str, int] | None
    output_file_id: str | None
    error_file_id: str | None
    created_at: datetime
    cancelling_at: datetime | None
    finished_at: datetime | None


class FileStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, owner: str, purpose: str, filename: str, content: bytes) -> FileRecord:
        record = FileRecord(
            FILE_ID_PREFIX + uuid.uuid4().hex, owner, purpose, filename, len(content), datetime.now(UTC),
        )
        with self.engine.begin() as connection:
            connection.execute(insert(files_table).values(
                file_id=record.file_id, owner=owner, purpose=purpose, filename=filename, bytes=len(content),
                content=content, created_at=record.created_at,
            ))
        return record

    def get(self, owner: str, file_id: str) -> FileRecord | None:
        columns = [files_table.c[name] for name in ("file_id", "owner", "purpose", "filename", "bytes", "created_at")]
        with self.engine.connect() as connection:
            row = connection.execute(
                select(*columns).where(files_table.c.file_id == file_id, files_table.c.owner == owner)
            ).mappings().first()
        if row is None:
            return None
        return FileRecord(row["file_id"], row["owner"], row["purpose"], row["filename"], row["bytes"], row["created_at"])

    def content(self, owner: str, file_id: str) -> bytes | None:
        with self.engine.connect() as connection:
            return connection.execute(
                select(files_table.c.content).where(files_table.c.file_id == file_id, files_table.c.owner == owner)
            ).scalar()

    def delete(self, file_ids: list[str]) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(files_table).where(files_table.c.file_id.in_(file_ids)))


class BatchStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, row: dict[str, Any]) -> BatchRow:
        row = {"created_at": datetime.now(UTC), **row}
        with self.engine.begin() as connection:
            connection.execute(insert(openai_batches_table).values(**row))
        found = self.get(row["owner"], row["batch_id"])
        assert found is not None
        return found

    def get(self, owner: str, batch_id: str) -> BatchRow | None:
        table = openai_batches_table
        with self.engine.connect() as connection:
            row = connection.execute(
                select(table).where(table.c.batch_id == batch_id, table.c.owner == owner)
            ).mappings().first()
        return None if row is None else BatchRow(**row)

    def page(self, owner: str, *, after: str | None, limit: int) -> tuple[list[BatchRow], bool]:
        """Newest first, `limit` of them after the batch `after` (OpenAI's cursor); and whether more follow."""
        table = openai_batches_table
        query = select(table).where(table.c.owner == owner)
        if after:
            cursor = self.get(owner, after)
            if cursor is not None:
                query = query.where(
                    (table.c.created_at < cursor.created_at)
                    | ((table.c.created_at == cursor.created_at) & (table.c.batch_id < cursor.batch_id))
                )
        query = query.order_by(table.c.created_at.desc(), table.c.batch_id.desc()).limit(limit + 1)
        with self.engine.connect() as connection:
            rows = [BatchRow(**row) for row in connection.execute(query).mappings().all()]
        return rows[:limit], len(rows) > limit

    def mark_cancelling(self, batch_id: str) -> None:
        table = openai_batches_table
        with self.engine.begin() as connection:
            connection.execute(
                update(table).where(table.c.batch_id == batch_id, table.c.cancelling_at.is_(None))
                .values(cancelling_at=datetime.now(UTC))
            )

    def finish(
        self, batch_id: str, *, request_counts: dict[str, int], output_file_id: str | None, error_file_id: str | None,
    ) -> bool:
        """Record a finished batch once; False when another request finished it first."""
        table = openai_batches_table
        with self.engine.begin() as connection:
            done = connection.execute(
                update(table).where(table.c.batch_id == batch_id, table.c.finished_at.is_(None)).values(
                    request_counts=request_counts, output_file_id=output_file_id, error_file_id=error_file_id,
                    finished_at=datetime.now(UTC),
                )
            )
        return bool(done.rowcount)
