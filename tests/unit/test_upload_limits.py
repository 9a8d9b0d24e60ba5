"""Hostile uploads: expansion bombs, datasets that cannot work, checks that spin or hog memory, orphans.

The API runs on its embedded stack (SQLite + a local object folder). Every file here is tiny on disk;
what it declares or does when read is what must be bounded.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from hostile_files import deflated_torch_save, scripted, zero_bomb
from upload_check_tasks import keep_megabytes

from api.app import create_app
from api.check_process import IsolatedChecker
from core.archive_limits import ExpansionLimits, npz_headers
from core.data import load_dataset
from core.errors import DataError
from core.npz_check import check_npz
from service.auth import create_api_key
from service.models import Dataset, Teacher
from service.paths import scrub_paths, server_roots
from service.settings import Settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

MAX_UPLOAD = 300_000  # x RD_MAX_EXPANSION_RATIO 4: an upload may expand to 1.2 MB
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- files


def _npz_bytes(compressed: bool = False, **arrays: Any) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _good_arrays(n: int = 20, classes: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), "y": np.arange(n) % classes}





def _truncated_npy_member(shape: tuple[int, ...]) -> bytes:
    """A member whose header declares ``shape`` uint8 but which holds only 16 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("x.npy", header.getvalue() + bytes(16))
        labels = io.BytesIO()
        np.save(labels, np.array([0, 1]))
        zf.writestr("y.npy", labels.getvalue())
    return out.getvalue()








# ---------------------------------------------------------------- the app


def _settings(root: Path, **overrides: Any) -> Settings:
    data = root / "data"
    (data / "cifar-10-batches-py-partial").mkdir(parents=True)
    (data / "cifar-10-batches-py-partial" / "batches.meta").write_bytes(b"x")
    limits = {"check_timeout_s": 4.0, "check_memory_mb": 768, "check_concurrency": 2, **overrides}
    return Settings(var_dir=root / "var", data_root=data, max_upload_bytes=MAX_UPLOAD, **limits)


def _key(app: Any, tenant: str) -> dict[str, str]:
    with app.state.session_factory() as session:
        key = create_api_key(session, tenant)
        session.commit()
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    settings = _settings(tmp_path_factory.mktemp("limits"))
    app = create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
    with TestClient(app) as client:
        yield SimpleNamespace(
            app=app, client=client, settings=settings, alice=_key(app, "alice"), bob=_key(app, "bob")
        )


def _rows(app: Any, model: type) -> int:
    with app.state.session_factory() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model)) or 0


def _post_dataset(env: SimpleNamespace, content: bytes, who: str = "alice") -> Any:
    return env.client.post("/v1/datasets", headers=getattr(env, who), files={"file": ("d.npz", content)})


def _post_teacher(env: SimpleNamespace, content: bytes, **form: Any) -> Any:
    return env.client.post(
        "/v1/teachers", headers=env.alice, files={"file": ("t.pt", content)}, data={"num_classes": 10, **form}
    )


def _refused(r: Any, *words: str) -> str:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    for word in words:
        assert word in detail, detail
    return detail


def _nothing_kept(env: SimpleNamespace) -> None:
    assert _rows(env.app, Dataset) == 0 and _rows(env.app, Teacher) == 0
    assert env.app.state.store.list_keys() == []
    uploads = env.settings.upload_dir
    assert not uploads.exists() or not any(uploads.iterdir())


# ---------------------------------------------------------------- expansion bombs


def test_npz_bomb_is_refused_from_its_declared_size(env: SimpleNamespace) -> None:
    bomb = zero_bomb()
    assert len(bomb) < MAX_UPLOAD  # 64 MiB of images in a file the upload limit lets through
    _refused(_post_dataset(env, bomb), "expands to more than 1200000 bytes", "RD_MAX_EXPANSION_RATIO=4")
    _nothing_kept(env)


def test_npy_header_is_checked_against_its_member_and_the_element_cap(tmp_path: Path) -> None:
    path = tmp_path / "forged.npz"
    path.write_bytes(_truncated_npy_member((2**32,)))  # declares 4 GiB, holds 16 bytes
    with pytest.raises(DataError, match="declares 4294967296 bytes .* truncated or forged"):
        load_dataset("npz", path, val_size=0)
    limits = ExpansionLimits(max_expanded_bytes=10**12, max_array_elements=1000, source="test")
    with pytest.raises(DataError, match=r"4294967296 elements .*at most 1000 .*RD_MAX_ARRAY_ELEMENTS"):
        npz_headers(path, "forged.npz", limits, DataError)


def test_torch_zip_bomb_is_refused_before_torch_reads_it(env: SimpleNamespace) -> None:
    bomb = deflated_torch_save(extra_floats=16 * 2**20)  # 64 MiB of zeros in about 70 KB
    assert len(bomb) < MAX_UPLOAD
    _refused(_post_teacher(env, bomb, arch="tiny_cnn"), "expands to more than", "RD_MAX_EXPANSION_RATIO")
    _nothing_kept(env)


def test_model_zip_may_not_unpack_far_beyond_its_own_size(tmp_path: Path) -> None:
    """Under a generous absolute limit a small teacher still may not inflate to many times its size:
    torch writes tensors uncompressed, so only a bomb does that."""
    from core.errors import ModelLoadError
    from core.teachers import load_model_file

    path = tmp_path / "t.pt"
    path.write_bytes(deflated_torch_save(extra_floats=8 * 2**20))  # 32 MiB of zeros in ~40 KB
    generous = ExpansionLimits(max_expanded_bytes=2**40, max_array_elements=2**40, source="test")
    with pytest.raises(ModelLoadError, match="the file's own size"):
        load_model_file(path, arch="tiny_cnn", num_classes=10, limits=generous)
    honest = tmp_path / "honest.pt"
    honest.write_bytes(deflated_torch_save(extra_floats=1))
    assert load_model_file(honest, arch="tiny_cnn", num_classes=10, limits=generous).num_classes == 10


def _legacy_torch_save(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def test_legacy_checkpoint_declaring_more_than_it_holds_is_refused_unread(env: SimpleNamespace) -> None:
    import struct

    import torch

    from core.models import create_model

    ok = _post_teacher(env, _legacy_torch_save(create_model("tiny_cnn", 10).state_dict()), arch="tiny_cnn")
    assert ok.status_code == 201, ok.text
    assert env.client.delete(f"/v1/teachers/{ok.json()['id']}", headers=env.alice).status_code == 204
    # A 31 KB file whose pickle asks torch to allocate a 1 GiB storage before reading its bytes.
    legacy = _legacy_torch_save({"sub_block1.w": torch.zeros(7919)})
    forged = legacy.replace(b"M" + struct.pack("<H", 7919), b"J" + struct.pack("<i", 2**28))
    _refused(
        _post_teacher(env, forged, arch="tiny_cnn"),
        "t.pt declares tensor storages of 1073741824 bytes but the file holds only",
    )
    _nothing_kept(env)


def test_datasets_are_checked_outside_the_api_process(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_here(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dataset was read in the API process")

    import core.data
    import core.npz_check

    monkeypatch.setattr(core.npz_check, "check_npz", not_here)
    monkeypatch.setattr(core.data, "load_dataset", not_here)
    r = _post_dataset(env, _npz_bytes(**_good_arrays()))
    assert r.status_code == 201, r.text
    assert env.client.delete(f"/v1/datasets/{r.json()['id']}", headers=env.alice).status_code == 204


# ---------------------------------------------------------------- datasets that cannot work


N = 10
IMAGES = np.zeros((N, 8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": IMAGES, "y": np.full(N, 2**40)}, "label 1099511627776; labels must be 0..C-1 with at most"),
        ({"x": IMAGES, "y": np.full(N, 2**64 - 1, np.uint64)}, "label 18446744073709551615"),
        ({"x": IMAGES, "y": np.arange(N) % 2 * (2**31 - 2)}, "label 2147483646"),
        ({"x": IMAGES, "y": np.arange(N) % 2, "num_classes": np.array(2**31 - 1)}, "num_classes is 2147483"),
        ({"x": np.zeros((N, 0, 0, 3), np.uint8), "y": np.arange(N) % 2}, "0x0 pixels; the students accept 8"),
        ({"x": np.zeros((N, 2048, 8, 1), np.uint8), "y": np.arange(N) % 2}, "2048x8 pixels"),
        ({"x": np.zeros((N, 2, 8, 8), np.float32), "y": np.arange(N) % 2}, "C = 1 or 3"),
        ({"x": np.full((N, 3, 8, 8), np.nan, np.float32), "y": np.arange(N) % 2}, "NaN or infinite"),
        ({"x": np.full((N, 3, 8, 8), 0.5, np.float32), "y": np.arange(N - 1) % 2}, "9 labels but there are"),
        ({"x": np.zeros((0, 8, 8, 3), np.uint8), "y": np.zeros(0, int)}, "x holds no images"),
        ({**_good_arrays(), "x_test": np.zeros((0, 8, 8, 3), np.uint8), "y_test": np.zeros(0, int)},
         "x_test holds no images"),
        ({"x": IMAGES[:4], "y": np.arange(4) % 2}, "too few to carve a test split"),
    ],
    ids=["label-2**40", "uint64-max", "label-2**31-2", "num-classes-2**31-1", "zero-sized-images",
         "too-tall", "two-channels", "nan", "lengths", "empty-train", "empty-test", "no-test-to-carve"],
)  # fmt: skip
def test_datasets_that_cannot_work_are_refused_naming_the_field(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(_npz_bytes(**arrays))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_npz(path, name="d.npz")
    with pytest.raises(DataError):  # the worker's and the CLI's loader refuse the same file
        load_dataset("npz", path, val_size=0)


def test_a_valid_dataset_is_summarised_without_loading_it(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    x = np.random.default_rng(0).random((12, 3, 8, 8), dtype=np.float32)
    path.write_bytes(_npz_bytes(compressed=True, x=x, y=np.arange(12) % 3, num_classes=np.array(5)))
    summary = check_npz(path)
    assert (summary.num_classes, summary.n_train, summary.n_test, summary.image_shape) == (
        5,
        12,
        0,
        (3, 8, 8),
    )


def test_huge_labels_are_422_not_500(env: SimpleNamespace) -> None:
    for labels in (np.full(N, 2**40), np.full(N, 2**64 - 1, np.uint64)):
        _refused(_post_dataset(env, _npz_bytes(x=IMAGES, y=labels)), "labels out of range")
    _nothing_kept(env)


# ---------------------------------------------------------------- no server paths in messages


def test_messages_name_the_users_file_not_server_paths(env: SimpleNamespace) -> None:
    r = env.client.post("/v1/datasets", headers=env.alice, files={"file": ("mine.npz", _npz_bytes(x=IMAGES))})
    detail = _refused(r, "mine.npz has no array 'y'")
    for secret in (str(env.settings.var_dir), str(REPO), "upload-", "/work/"):
        assert secret not in detail


def test_scrub_paths_keeps_only_the_last_component(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    scratch = settings.upload_dir / "upload-abc123" / "x.npz"
    text = f"{scratch} is broken; see '{settings.var_dir / 'objects' / 'k'}' and {REPO / 'core' / 'data.py'}"
    assert scrub_paths(text, server_roots(settings)) == "x.npz is broken; see 'k' and data.py"


# ---------------------------------------------------------------- time, memory, fairness


def _concurrently(*calls: Any) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_spinning_model_times_out_and_other_tenants_are_answered_meanwhile(env: SimpleNamespace) -> None:
    spin = scripted("spin")
    result: dict[str, Any] = {}
    # Two checking processes with torch imported: neither upload below waits for a process to start.
    warm = _concurrently(*[lambda: _post_dataset(env, _npz_bytes(**_good_arrays()))] * 2)
    for r in warm:
        assert env.client.delete(f"/v1/datasets/{r.json()['id']}", headers=env.alice).status_code == 204

    def slow_upload() -> None:
        result["response"] = _post_teacher(env, spin)

    thread = threading.Thread(target=slow_upload)
    started = time.monotonic()
    thread.start()
    time.sleep(0.5)
    r = _post_dataset(env, _npz_bytes(**_good_arrays()), who="bob")  # bob's small upload meanwhile
    assert r.status_code == 201, r.text
    assert thread.is_alive(), "the spinning check should still be running while bob is answered"
    thread.join(timeout=60)
    assert time.monotonic() - started < 30  # killed at RD_CHECK_TIMEOUT_S, not left to spin for minutes
    _refused(result["response"], "took longer than RD_CHECK_TIMEOUT_S=4 s")
    env.client.delete(f"/v1/datasets/{r.json()['id']}", headers=env.bob)


def test_memory_hog_is_refused_naming_the_limit(env: SimpleNamespace) -> None:
    _refused(_post_teacher(env, scripted("hog")), "used more than RD_CHECK_MEMORY_MB=768 MB")
    _nothing_kept(env)


def test_a_child_that_kept_memory_is_replaced() -> None:
    async def scenario() -> list[int]:
        checker = IsolatedChecker(
            timeout_s=60, memory_mb=1024, concurrency=1, recycle_mb=128, preload=("numpy",)
        )
        try:
            pids = [await checker.run(os.getpid), await checker.run(os.getpid)]
            pids.append(await checker.run(keep_megabytes, 300))
            pids.append(await checker.run(os.getpid))
            return pids
        finally:
            checker.shutdown()

    first, second, kept, after = asyncio.run(scenario())
    assert first == second == kept  # a healthy child serves the next check
    assert after != kept  # the one that kept 300 MB was retired


# ---------------------------------------------------------------- no orphans

_STARTS_A_CHECK = """
import asyncio, time
from api.check_process import IsolatedChecker

async def main():
    checker = IsolatedChecker(timeout_s=120, memory_mb=512, concurrency=1)
    check = asyncio.ensure_future(checker.run(time.sleep, 120))
    while not checker.child_pids():
        await asyncio.sleep(0.01)
    print(checker.child_pids()[0], flush=True)
    await check

asyncio.run(main())
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has exited; only its entry waits for a reaper


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return _gone(pid)


@pytest.mark.parametrize("delay", [0.0, 4.0], ids=["while-starting", "while-checking"])
def test_checker_children_die_with_a_killed_parent(delay: float) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _STARTS_A_CHECK], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(delay)
        assert not _gone(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert _wait_gone(child, 5), f"checking process {child} outlived its SIGKILLed parent"


def test_app_shutdown_kills_checker_children(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    app = create_app(settings, enqueue=lambda job_id: None, revoke=lambda job_id: None)
    with TestClient(app) as client:
        r = client.post(
            "/v1/datasets",
            headers=_key(app, "alice"),
            files={"file": ("d.npz", _npz_bytes(**_good_arrays()))},
        )
        assert r.status_code == 201, r.text
        children = app.state.checker.child_pids()
        assert children and not any(_gone(pid) for pid in children)
    assert all(_wait_gone(pid, 5) for pid in children)
