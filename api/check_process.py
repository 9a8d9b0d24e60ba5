"""Checking uploaded files in child processes, each check bounded in time and memory.

An uploaded file is untrusted and reading it can cost far more than its size (a TorchScript forward can
spin, a legacy pickle can declare a huge storage). Checks therefore run in spawned children, never in the
API process:

- **time**: the parent waits at most ``timeout_s`` for an answer, then SIGKILLs the child (422 naming
  ``RD_CHECK_TIMEOUT_S``);
- **memory**: a child caps its own address space (``RLIMIT_AS``) at what it uses after its imports plus
  ``memory_mb``; an allocation past it fails inside the child (422 naming ``RD_CHECK_MEMORY_MB``);
- **fairness**: at most ``concurrency`` checks run at once, each in its own child (the rest wait for a
  slot), so a slow check of one tenant holds one slot, not the others;
- **memory returns**: after each check a child collects garbage and hands freed heap back to the system
  (``malloc_trim``); a child still ``recycle_mb`` above its starting size, or one that hit the memory
  limit, exits and a fresh one takes its place;
- **no orphans**: a child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``) and a
  watchdog thread exits it when its parent changes, so it never outlives the API (or a test run);
  ``shutdown`` kills every child.

A child serves consecutive checks while it stays healthy: starting one (importing torch) costs about
2.5 s of CPU, more than most checks. The files a check reads are never unpickled into code (core.teachers),
so one check cannot change what the next one sees. When a child is retired its successor is started at
once (a warm spare), so the next check does not wait for the imports.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib
import logging
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from core.errors import UserError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
REPO = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "core.teachers", "core.npz_check")
# A child's own start (imports) is not the tenant's time; this only bounds a machine too busy to start one.
STARTUP_TIMEOUT_S = 120.0
_OOM_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "std::bad_alloc")


class CheckLimitError(UserError):
    """A check ran past its time or memory limit, or its process died; the message names the limit."""


# ---------------------------------------------------------------- the child


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL from the kernel when the parent dies, and a watchdog for when that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before the request above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _address_space_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` or anything in its chain is an allocation failure (numpy, torch or the JIT's)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in _OOM_WORDS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back to the system
    except (OSError, AttributeError):
        pass


def _run_one(fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except BaseException as exc:  # everything goes back to the parent, which decides
        if _out_of_memory(exc):
            return "memory", None
        if isinstance(exc, UserError):
            return "user", exc
        return "error", f"{type(exc).__name__}: {str(exc)[:300]}"


def child_entry() -> None:
    """``python -c 'from api.check_process import child_entry; child_entry()' FD PARENT MEM RECYCLE
    MODULES``: MODULES (comma-separated) are imported before the first check."""
    fd, parent_pid, memory_bytes, recycle_bytes = (int(v) for v in sys.argv[1:5])
    preload = tuple(m for m in sys.argv[5].split(",") if m) if len(sys.argv) > 5 else PRELOAD
    _child_main(Connection(fd), parent_pid, memory_bytes, recycle_bytes, preload)


def _child_main(
    conn: Connection, parent_pid: int, memory_bytes: int, recycle_bytes: int, preload: tuple[str, ...]
) -> None:
    _die_with_parent(parent_pid)
    for module in preload:
        importlib.import_module(module)
    if "torch" in preload:
        import torch

        torch.set_num_threads(1)  # one core per check: concurrent checks share the machine fairly
    _return_memory()
    gc.freeze()  # the imports' objects: never collected, so a collection after each check takes ~1 ms
    base_vm, base_rss = _address_space_bytes(), _resident_bytes()
    if memory_bytes > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = base_vm + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    conn.send(("ready", None, False))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as exc:  # a task this process cannot even unpickle: say so, then leave
            conn.send(("error", f"cannot receive the task: {type(exc).__name__}: {exc}", True))
            return
        kind, value = _run_one(fn, args)
        del fn, args
        _return_memory()
        # Retire rather than carry what a check left behind into the next one.
        retire = (
            kind == "memory"
            or _resident_bytes() > base_rss + recycle_bytes
            or _address_space_bytes() > base_vm + memory_bytes // 2
        )
        _send_reply(conn, kind, value, retire)
        if retire:
            return


def _send_reply(conn: Connection, kind: str, value: Any, retire: bool) -> None:
    """Send the outcome; one that cannot be pickled (an odd exception) goes back as its text."""
    try:
        conn.send((kind, value, retire))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        text = str(value) if kind == "user" else f"the check's result cannot be sent back: {exc}"
        conn.send(("user", UserError(text), retire) if kind == "user" else ("error", text, retire))


# ---------------------------------------------------------------- the parent


@dataclass(eq=False)
class _Child:
    process: subprocess.Popen[bytes]
    conn: Connection
    ready: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("checking process %s did not die on SIGKILL", self.process.pid)
        self.conn.close()


async def _readable(conn: Connection, timeout: float) -> bool:
    """Wait without a thread until ``conn`` has a message (or its child is gone); False on timeout."""
    if conn.poll(0):
        return True
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


class IsolatedChecker:
    """Runs ``fn(*args)`` in a checking child process, within the limits in the module docstring."""

    def __init__(
        self,
        *,
        timeout_s: float,
        memory_mb: int,
        concurrency: int,
        recycle_mb: int = 256,
        preload: tuple[str, ...] = PRELOAD,
    ) -> None:
        self.preload = preload
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.concurrency = concurrency
        self.recycle_mb = recycle_mb
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()
        self._gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def _slots(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._gate is None or self._gate[0] is not loop:
            self._gate = (loop, asyncio.Semaphore(self.concurrency))
        return self._gate[1]

    def _spawn(self) -> _Child:
        # A plain interpreter, not multiprocessing's spawn: that would re-run the parent's __main__
        # (uvicorn's, pytest's) in every child. Started from the event loop's thread: PR_SET_PDEATHSIG
        # fires when the starting *thread* ends, so a short-lived worker thread must never start one.
        parent_end, child_end = socket.socketpair()
        mb = 1024 * 1024
        # The parent's own import path, so the child imports the task's function the way the parent does.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *(p for p in sys.path if p)])}
        env.setdefault("OMP_NUM_THREADS", "1")
        command = [
            sys.executable, "-c", "from api.check_process import child_entry; child_entry()",
            str(child_end.fileno()), str(os.getpid()), str(self.memory_mb * mb), str(self.recycle_mb * mb),
            ",".join(self.preload),
        ]  # fmt: skip
        try:
            process = subprocess.Popen(command, pass_fds=[child_end.fileno()], env=env, cwd=REPO)
        finally:
            child_end.close()
        child = _Child(process, Connection(parent_end.detach()))
        with self._lock:
            self._children.add(child)
        return child

    def _take(self) -> _Child:
        while True:
            with self._lock:
                child = self._idle.pop() if self._idle else None
            if child is None:
                return self._spawn()
            if child.alive():
                return child
            self._discard(child)

    def _discard(self, child: _Child) -> None:
        child.kill()
        with self._lock:
            self._children.discard(child)

    def _keep_one_warm(self) -> None:
        """After a child was retired, start its successor now, so the next check finds torch imported."""
        with self._lock:
            wanted = not self._idle and len(self._children) < self.concurrency
        if wanted:
            child = self._spawn()
            with self._lock:
                self._idle.append(child)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a child; its UserError comes back as itself, a limit as ``CheckLimitError``."""
        async with self._slots():
            child = self._take()
            healthy = False
            try:
                if not child.ready:
                    if not await _readable(child.conn, STARTUP_TIMEOUT_S):
                        raise CheckLimitError("the server is too busy to check the file now; try again later")
                    self._receive(child)
                    child.ready = True
                child.conn.send((fn, args))
                if not await _readable(child.conn, self.timeout_s):
                    raise CheckLimitError(
                        f"checking the file took longer than RD_CHECK_TIMEOUT_S={self.timeout_s:g} s; "
                        "upload a model whose load and one forward pass on two images finish in time"
                    )
                kind, value, retire = self._receive(child)
                healthy = not retire
            finally:
                if healthy:
                    with self._lock:
                        self._idle.append(child)
                else:
                    self._discard(child)
                    self._keep_one_warm()
        if kind == "ok":
            return value
        if kind == "user":
            raise value
        if kind == "memory":
            raise CheckLimitError(
                f"checking the file used more than RD_CHECK_MEMORY_MB={self.memory_mb} MB of memory"
            )
        log.warning("checking an upload failed unexpectedly: %s", value)
        raise CheckLimitError(f"the file could not be checked: {value}")

    def _receive(self, child: _Child) -> tuple[str, Any, bool]:
        try:
            return child.conn.recv()
        except (EOFError, OSError):
            pass
        try:
            code = child.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        raise CheckLimitError(
            f"the checking process died ({how}) on this file: it needs more than "
            f"RD_CHECK_MEMORY_MB={self.memory_mb} MB of memory or is malformed"
        )

    def shutdown(self) -> None:
        """Kill every child (busy or idle); the checker can still start new ones afterwards."""
        with self._lock:
            children, self._children, self._idle = list(self._children), set(), []
        for child in children:
            child.kill()

    def child_pids(self) -> list[int]:
        """The process ids of the live children (for tests and diagnostics)."""
        with self._lock:
            return [c.process.pid for c in self._children]
