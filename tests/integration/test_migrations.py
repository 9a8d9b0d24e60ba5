"""Migrations build exactly the schema the ORM models describe, and take it down again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from service.db import MIGRATIONS_DIR, alembic_config, downgrade_to_base, make_engine, upgrade_to_head
from service.models import Base

APP_TABLES = {t.name for t in Base.metadata.sorted_tables}


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _check_roundtrip(url: str) -> None:
    assert _tables(url) == set()
    upgrade_to_head(url)
    assert _diff(url) == []
    assert _tables(url) == APP_TABLES | {"alembic_version"}
    upgrade_to_head(url)  # a second run is a no-op
    downgrade_to_base(url)
    assert _tables(url) == {"alembic_version"}
    upgrade_to_head(url)  # and it comes back up from base
    assert _diff(url) == []


@pytest.mark.integration
def test_postgres_upgrade_matches_models_and_downgrades(make_database: Callable[[], str]) -> None:
    _check_roundtrip(make_database())


def test_sqlite_upgrade_matches_models_and_downgrades(tmp_path: Path) -> None:
    _check_roundtrip(f"sqlite:///{tmp_path / 'rd.sqlite3'}")


def test_one_linear_history_without_app_imports() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        # A revision must not depend on application code that later changes.
        text = path.read_text()
        assert "import service" not in text and "from service" not in text, path.name
