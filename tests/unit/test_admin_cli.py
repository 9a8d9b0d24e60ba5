"""``distill-admin create-key``: the tenant as the README writes it (positional) or as ``--tenant``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api import admin
from service.settings import get_settings


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RD_VAR_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert admin.main(["upgrade"]) == 0
        yield
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("argv", [["create-key", "acme"], ["create-key", "--tenant", "acme"]])
def test_create_key_takes_the_tenant_either_way(
    embedded: None, argv: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert admin.main(argv) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("rd_")
    assert admin.main(["list-keys"]) == 0
    assert "acme" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["create-key"], "needs a tenant"),
        (["create-key", "  "], "needs a tenant"),
        (["create-key", "a", "--tenant", "b"], "two different tenants"),
    ],
)
def test_create_key_without_one_clear_tenant_fails(
    embedded: None, argv: list[str], words: str, capsys: pytest.CaptureFixture
) -> None:
    assert admin.main(argv) == 2
    assert words in capsys.readouterr().err
