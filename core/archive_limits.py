"""Bounds on what a small file may expand to, checked from its declared sizes before any of it is read.

A zip (an ``.npz``, a TorchScript or ``torch.save`` file, a ``.pt2`` archive) declares every member's
uncompressed size in its central directory, and an ``.npy`` member declares its array's shape and dtype
in a short header. Readers trust those numbers: numpy allocates the declared array before reading it,
and PyTorch's zip reader allocates each record's declared size. So a 4 MB file can ask for 4 GiB.
Reading only the central directory and the ``.npy`` headers (a few hundred bytes each) and comparing
them with ``ExpansionLimits`` refuses such a file before any reader allocates anything.

Python's ``zipfile`` never inflates a member beyond its declared size (and checks its CRC), so the
declared sizes really bound what reading produces. safetensors readers check that the header's tensors
exactly cover the file, so a safetensors file cannot expand; ``check_safetensors`` checks the same
before the library maps it. Legacy (non-zip) ``torch.save`` files declare each storage's size inside
the pickle and torch allocates it before reading its bytes, which follow the pickle in the same file:
``check_legacy_torch`` adds up the declared sizes by walking the pickle's opcodes (nothing is unpickled)
and refuses a file whose storages could not fit in it.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import UserError

# A central directory entry costs the reader a few hundred bytes of Python objects; real archives have
# at most a few thousand members (one per tensor), so this bounds the directory, not real files.
MAX_ZIP_MEMBERS = 100_000
MAX_NPY_HEADER = 10_000
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# torch.save, TorchScript and torch.export write their tensors uncompressed (measured: a model zip
# unpacks to 0.99-1.0x its size), so a model zip that declares much more than its own size is a bomb
# whatever the absolute limit says: a 1 MB teacher may not unpack to 1 GiB. The slack covers the few
# small deflated members (TorchScript code) of tiny models.
MODEL_ZIP_RATIO = 2
MODEL_ZIP_SLACK = 16 * 1024 * 1024


@dataclass(frozen=True)
class ExpansionLimits:
    """How much a file may expand to: in total (every member together) and per array (elements).

    ``source`` names where the numbers come from, so a refusal can say which setting to change.
    """

    max_expanded_bytes: int
    max_array_elements: int
    source: str = "the expansion limit"

    def check_elements(self, what: str, count: int, error: type[UserError]) -> None:
        """Refuse one array (``what`` names it) of more than ``max_array_elements`` elements."""
        if count > self.max_array_elements:
            raise error(f"{what} declares {count} elements (at most {self.max_array_elements} are accepted "
                        "per array: RD_MAX_ARRAY_ELEMENTS)")

    @classmethod
    def from_upload_limit(cls, max_upload_bytes: int, ratio: int, max_array_elements: int) -> ExpansionLimits:
        """``ratio`` x the upload limit: an upload may decompress to what ``ratio`` uploads would hold."""
        return cls(
            max_expanded_bytes=int(ratio) * int(max_upload_bytes),
            max_array_elements=int(max_array_elements),
            source=f"RD_MAX_EXPANSION_RATIO={ratio} x RD_MAX_UPLOAD_BYTES={max_upload_bytes}",
        )


@dataclass(frozen=True)
class NpyHeader:
    """One ``.npy`` member of an ``.npz``: its declared array and where its data starts in the member."""

    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)


def zip_members(
    path: Path,
    name: str,
    limits: ExpansionLimits | None,
    error: type[UserError] = UserError,
    *,
    model: bool = False,
) -> list[zipfile.ZipInfo]:
    """The members of the zip at ``path`` after checking their declared sizes against ``limits``; a
    ``model`` zip also against its own size (``MODEL_ZIP_RATIO``)."""
    try:
        with path.open("rb") as f:
            end = zipfile._EndRecData(f)  # the end record alone: the member count before the directory
        if end is None:
            raise zipfile.BadZipFile("no end of central directory")
        if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ZIP_MEMBERS:
            raise error(
                f"{name} is a zip of {end[zipfile._ECD_ENTRIES_TOTAL]} members; at most "
                f"{MAX_ZIP_MEMBERS} are accepted"
            )
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise error(f"{name} is not a readable zip archive ({exc})") from None
    if len(members) > MAX_ZIP_MEMBERS:
        raise error(f"{name} is a zip of {len(members)} members; at most {MAX_ZIP_MEMBERS} are accepted")
    if limits is not None:
        bound, source = limits.max_expanded_bytes, limits.source
        if model:
            own = path.stat().st_size * MODEL_ZIP_RATIO + MODEL_ZIP_SLACK
            if own < bound:
                bound = own
                source = (f"{MODEL_ZIP_RATIO} x the file's own size + {MODEL_ZIP_SLACK} bytes (model files "
                          "store their tensors uncompressed)")
        total = 0
        for info in members:
            total += info.file_size
            if total > bound:
                raise error(
                    f"{name} expands to more than {bound} bytes when unpacked "
                    f"(member {info.filename!r} alone declares {info.file_size}); the limit is {source}"
                )
    return members


def _read_npy_header(f: zipfile.ZipExtFile) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype), f.tell()


def npz_headers(
    path: Path, name: str, limits: ExpansionLimits | None, error: type[UserError] = UserError
) -> dict[str, NpyHeader]:
    """Every array of an ``.npz`` as its header declares it (key without ``.npy``), checked against
    ``limits`` and against the member's own size, without reading any array data."""
    members = zip_members(path, name, limits, error)
    headers: dict[str, NpyHeader] = {}
    with zipfile.ZipFile(path) as zf:
        for info in members:
            if info.is_dir():
                continue
            key = info.filename.removesuffix(".npy")
            try:
                with zf.open(info) as f:
                    shape, fortran, dtype, offset = _read_npy_header(f)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
                raise error(
                    f"{name}: member {info.filename!r} is not a readable .npy array ({exc})"
                ) from None
            header = NpyHeader(info.filename, shape, dtype, fortran, offset)
            if dtype.hasobject:
                raise error(
                    f"{name}: cannot read array {key!r} without unpickling Python objects; "
                    "store numeric arrays"
                )
            if any(s < 0 for s in shape):
                raise error(f"{name}: array {key!r} declares a negative dimension {shape}")
            nbytes = header.count * dtype.itemsize
            if limits is not None:
                limits.check_elements(f"{name}: array {key!r} {shape}", header.count, error)
            if limits is not None and nbytes > limits.max_expanded_bytes:
                raise error(
                    f"{name}: array {key!r} declares {nbytes} bytes {shape}; more than the "
                    f"{limits.max_expanded_bytes} bytes allowed ({limits.source})"
                )
            if offset + nbytes != info.file_size:
                raise error(
                    f"{name}: array {key!r} declares {nbytes} bytes of data {shape} but its member holds "
                    f"{info.file_size - offset}; the file is truncated or forged"
                )
            headers[key] = header
    return headers


def iter_npy_chunks(path: Path, header: NpyHeader, chunk_bytes: int = 1 << 24) -> Iterator[np.ndarray]:
    """The array's elements in memory order, a bounded chunk at a time (a 1-D view per chunk), so a
    big array can be checked without holding it; reading to the end also checks the member's CRC."""
    itemsize = max(header.dtype.itemsize, 1)
    per_chunk = max(1, chunk_bytes // itemsize)
    remaining = header.count
    with zipfile.ZipFile(path) as zf, zf.open(header.member) as f:
        f.read(header.data_offset)
        while remaining > 0:
            n = min(per_chunk, remaining)
            data = f.read(n * itemsize)
            if len(data) != n * itemsize:
                raise EOFError(f"array data ends after {header.count - remaining} of {header.count} elements")
            remaining -= n
            yield np.frombuffer(data, dtype=header.dtype)
        f.read()  # to the end of the member: zipfile checks the CRC there


def check_safetensors(path: Path, name: str, limits: ExpansionLimits | None, error: type[UserError]) -> None:
    """The header's tensors must lie inside the file and match their shapes and dtypes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise error(f"{name} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise error(f"{name}: the safetensors header declares {header_len} bytes; the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as exc:
            raise error(f"{name}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise error(f"{name}: the safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    widths = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
              "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
    total = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            shape = [int(s) for s in meta["shape"]]
            begin, end = (int(v) for v in meta["data_offsets"])
            width = widths[str(meta["dtype"])]
        except (KeyError, TypeError, ValueError):
            raise error(f"{name}: tensor {str(key)[:80]!r} has a malformed safetensors entry") from None
        count = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or count * width != end - begin:
            raise error(
                f"{name}: tensor {str(key)[:80]!r} declares {shape} {meta['dtype']} at bytes {begin}..{end}, "
                f"which does not fit the {data_size} bytes of data in the file"
            )
        if limits is not None:
            limits.check_elements(f"{name}: tensor {str(key)[:80]!r}", count, error)
        total += end - begin
    if limits is not None and total > limits.max_expanded_bytes:
        raise error(
            f"{name}: its tensors hold {total} bytes, more than {limits.max_expanded_bytes} ({limits.source})"
        )


# Bytes per element of the legacy storage classes (torch.<Name>Storage); unknown names count 16.
_STORAGE_WIDTHS = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
    "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "Untyped": 1,
}  # fmt: skip
_MARK = object()
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _declared_storage(pid: object) -> tuple[object, int]:
    """(key, bytes) a legacy persistent id ('storage', torch.XStorage, key, location, numel, ...) asks for;
    views of one storage repeat its key, and torch allocates it once."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        return None, 0
    kind, key, numel = pid[1], pid[2], pid[4]
    name = kind[2] if isinstance(kind, tuple) and len(kind) == 3 else ""
    width = _STORAGE_WIDTHS.get(str(name).removesuffix("Storage"), 16)
    return key, (int(numel) * width if isinstance(numel, int) and numel > 0 else 0)


def _pickle_storage_bytes(f: io.BufferedReader) -> int:
    """Walk one pickle's opcodes (never executing it) and add up the storages it declares."""
    stack: list[object] = []
    memo: dict[object, object] = {}
    storages: dict[object, int] = {}

    def pop_to_mark() -> list[object]:
        items: list[object] = []
        while stack:
            item = stack.pop()
            if item is _MARK:
                return items[::-1]
            items.append(item)
        raise ValueError("pickle stack underflow")

    for op, arg, _ in pickletools.genops(f):
        name = op.name
        if name == "STOP":
            return sum(storages.values())
        if name == "MARK":
            stack.append(_MARK)
        elif name == "GLOBAL":
            stack.append(("global", *str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL":
            qual, module = stack.pop(), stack.pop()
            stack.append(("global", module, qual))
        elif name in _MEMO_PUT:
            memo[arg] = stack[-1] if stack else None
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else None
        elif name in _MEMO_GET:
            stack.append(memo.get(arg))
        elif name == "TUPLE":
            stack.append(tuple(pop_to_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items, stack[-n:] = stack[-n:], []
            stack.append(tuple(items))
        elif name == "BINPERSID":
            key, nbytes = _declared_storage(stack.pop())
            storages[repr(key)] = max(nbytes, storages.get(repr(key), 0))
            stack.append(None)
        else:  # any other opcode: only its effect on the stack's depth matters here
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                below = before.index(pickletools.markobject)
            else:
                below = len(before)
            if below:
                if len(stack) < below:
                    raise ValueError("pickle stack underflow")
                del stack[-below:]
            after = op.stack_after
            stack.extend([arg if not before and len(after) == 1 else None] * len(after))
    raise ValueError("pickle without STOP")


def check_legacy_torch(path: Path, name: str, limits: ExpansionLimits | None, error: type[UserError]) -> None:
    """A legacy ``torch.save`` file (magic, protocol, sys_info, the object, then the storages' bytes):
    the storages its object declares must fit in the file, and in ``limits``."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            for _ in range(3):  # the magic number, the protocol version, the system info
                for _op in pickletools.genops(f):
                    pass
            declared = _pickle_storage_bytes(f)  # type: ignore[arg-type]
    except (ValueError, TypeError, IndexError, KeyError, EOFError, OSError):
        raise error(f"{name} is not a readable PyTorch checkpoint (its pickle is malformed)") from None
    if declared > size:
        raise error(
            f"{name} declares tensor storages of {declared} bytes but the file holds only {size}; "
            "the file is truncated or forged"
        )
    if limits is not None and declared > limits.max_expanded_bytes:
        raise error(
            f"{name} declares {declared} bytes of tensors, more than {limits.max_expanded_bytes} "
            f"({limits.source})"
        )
