"""Loading teacher models from files that users upload, without ever running code hidden in them.

A model file is untrusted input. Pickle-based formats are read only through ``torch.load(...,
weights_only=True)``; TorchScript through TorchScript's own restricted loader; safetensors holds no
code at all. ``torch.export`` archives are the awkward case: ``torch.export.load`` falls back to full
unpickling, parses symbolic shapes with ``sympy.sympify`` (``eval``), ``exec``s stored guard code and
can load native AOTInductor libraries, so an archive is read into memory and vetted (``_vet_export``)
before torch sees the very same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.archive_limits import ExpansionLimits, check_legacy_torch, check_safetensors, zip_members
from core.errors import ConfigError, ModelLoadError
from core.exported import is_onnx_request, load_onnx, metadata_normalize, safetensors_metadata
from core.models import create_model, list_models

Stats = tuple[float, ...]

NAMED_NORMALIZATIONS: dict[str, tuple[Stats, Stats]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

FORMATS = ("torchscript", "export", "state_dict", "safetensors")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "params")
# Files saved by torch.save(..., _use_new_zipfile_serialization=False) start with the pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_PICKLE_EXTS = {".pt", ".pth", ".model", ".bin", ".ckpt", ".tar", ".pkl"}
_REFUSED = (
    "refused: the file contains pickled Python objects that could run code; save a state_dict "
    "(torch.save(model.state_dict())) or safetensors"
)


@dataclass
class LoadedModel:
    """A ready teacher: eval mode, frozen, on its device, with what was learnt while loading it."""

    model: nn.Module
    format: str
    arch: str | None
    num_classes: int
    num_params: int
    normalize: tuple[Stats, Stats] | None
    probe: dict[str, Any] = field(default_factory=dict)


class Normalized(nn.Module):
    """Applies ``(x - mean) / std`` before ``model`` so that callers (and attacks) stay in [0, 1] space."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean:
            raise ConfigError(f"normalisation mean and std need the same non-zero length, got {mean}, {std}")
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


class _FrozenProgram(nn.Module):
    """Holds ``ExportedProgram.module()``, which refuses ``.eval()``; its mode was fixed at export time."""

    def __init__(self, graph_module: nn.Module) -> None:
        super().__init__()
        self.program = graph_module

    def train(self, mode: bool = True) -> _FrozenProgram:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


def parse_normalize(spec: str) -> tuple[Stats, Stats]:
    """Parse ``"m1,m2,m3;s1,s2,s3"`` or a dataset name (``cifar10``, ``cifar100``) into (mean, std)."""
    text = str(spec).strip().lower()
    if text in NAMED_NORMALIZATIONS:
        return NAMED_NORMALIZATIONS[text]
    hint = (
        "give 'cifar10', 'cifar100' or 'mean;std' with comma-separated numbers, "
        "e.g. '0.4914,0.4822,0.4465;0.2471,0.2435,0.2616'"
    )
    parts = text.split(";")
    if len(parts) != 2:
        raise ConfigError(f"cannot parse normalisation {spec!r}: {hint}")
    try:
        mean, std = (tuple(float(v) for v in p.split(",")) for p in parts)
    except ValueError:
        raise ConfigError(f"cannot parse normalisation {spec!r}: {hint}") from None
    if len(mean) != len(std):
        raise ConfigError(f"normalisation {spec!r} has {len(mean)} means but {len(std)} stds")
    if not all(math.isfinite(v) for v in mean + std) or any(s <= 0 for s in std):
        raise ConfigError(f"normalisation {spec!r}: values must be finite and every std > 0")
    return mean, std


def probe_model(
    model: nn.Module,
    num_classes: int | None,
    *,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    device: str | torch.device = "cpu",
    batch: int = 2,
) -> dict[str, Any]:
    """One forward pass on random images, so a wrong architecture or dataset fails at upload time."""
    was_training = model.training
    model.eval()
    x = torch.rand((batch, *input_shape), device=device)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure inside a user's model is the user's to fix
        raise ModelLoadError(
            f"the model failed on a ({batch}, {', '.join(map(str, input_shape))}) batch of images in [0,1]: "
            f"{type(exc).__name__}: {_first_line(exc)}; check the architecture and the dataset's image size"
        ) from exc
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if not isinstance(out, Tensor):
        raise ModelLoadError(
            f"the model returns {type(out).__name__}, not a tensor of logits; export a model whose "
            "forward returns only the logits"
        )
    shape = list(out.shape)
    if out.dim() != 2 or shape[0] != batch:
        raise ModelLoadError(f"the model outputs shape {tuple(shape)}; expected ({batch}, classes) logits")
    if num_classes is not None and shape[1] != num_classes:
        raise ModelLoadError(
            f"model outputs {tuple(shape)} but the dataset has {num_classes} classes; "
            "pass the right dataset or --teacher-arch"
        )
    if not bool(torch.isfinite(out).all()):
        raise ModelLoadError("the model's outputs on random images are not finite (NaN or inf)")
    return {"output_shape": shape, "finite": True, "seconds": round(seconds, 4)}


def load_model_file(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    normalize: str | tuple[Sequence[float], Sequence[float]] | None = None,
    fmt: str = "auto",
    device: str | torch.device = "cpu",
    input_shape: tuple[int, int, int] = (3, 32, 32),
    limits: ExpansionLimits | None = None,
    allow_onnx: bool = False,
) -> LoadedModel:
    """Load a teacher from a file of any supported format, check it with a probe and freeze it.

    ``limits`` bounds what the file may expand to; it is checked from the declared sizes (zip members,
    safetensors header) before any reader allocates them (see core.archive_limits). A safetensors file
    whose metadata names its architecture (``core.export``) needs no ``arch``. ``allow_onnx`` (the
    evaluate CLI, never uploads) also reads ``.onnx`` files, as forward-only models (core.exported).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file {str(p)!r} does not exist or is not a file")
    fmt = (fmt or "auto").strip().lower()
    known_formats = (*FORMATS, "onnx") if allow_onnx else FORMATS
    if fmt not in known_formats and fmt != "auto":
        raise ConfigError(f"unknown model format {fmt!r}; use auto or one of {', '.join(known_formats)}")
    _check_expansion(p, limits)
    if fmt == "auto":
        fmt = "onnx" if allow_onnx and is_onnx_request(p, fmt) else sniff_format(p)
    norm = _normalization(normalize)

    if fmt == "onnx":
        model: nn.Module = load_onnx(p)
    elif fmt == "safetensors":
        meta = safetensors_metadata(p)  # {} unless written by core.export (student_metadata's keys)
        arch = arch or meta.get("architecture") or None
        if norm is None:
            norm = metadata_normalize(meta)
        model = _build_from_state_dict(_clean_keys(_load_safetensors(p)), arch, num_classes)
    elif fmt == "torchscript":
        model = _load_torchscript(p)
    elif fmt == "export":
        model = _load_export(p)
    else:
        tensors = _find_state_dict(_load_pickle(p))
        model = _build_from_state_dict(_clean_keys(tensors), arch, num_classes)

    num_params = int(getattr(model, "num_params", 0)) or sum(t.numel() for t in model.parameters())
    if norm is not None:
        model = Normalized(model, *norm)
    model = model.to(device)
    model.eval()
    for t in model.parameters():
        t.requires_grad_(False)
    try:
        probe = probe_model(model, num_classes, input_shape=input_shape, device=device)
        if fmt == "export":
            # A program exported with a fixed batch size would fail on the last, smaller batch of a run.
            probe_model(model, num_classes, input_shape=input_shape, device=device, batch=3)
    except ModelLoadError as exc:
        if fmt == "export" and "failed on a" in str(exc):
            raise ModelLoadError(
                f"{exc}. Export with a dynamic batch dimension: torch.export.export(model, (x,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},))"
            ) from exc
        raise
    return LoadedModel(
        model=model,
        format=fmt,
        arch=arch if fmt in ("state_dict", "safetensors") else None,
        num_classes=probe["output_shape"][1],
        num_params=num_params,
        normalize=norm,
        probe=probe,
    )


def _check_expansion(path: Path, limits: ExpansionLimits | None) -> None:
    """Zip-based formats by their members' declared sizes, safetensors by its header."""
    if limits is None:  # a local file of the CLI's own user
        return
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        zip_members(path, path.name, limits, ModelLoadError, model=True)
    elif len(head) == 9 and _LEGACY_MAGIC.startswith(head):
        check_legacy_torch(path, path.name, limits, ModelLoadError)
    elif len(head) == 9 and head[8:9] == b"{":
        check_safetensors(path, path.name, limits, ModelLoadError)


def sniff_format(path: Path) -> str:
    """Decide the format from the bytes, falling back to the extension only for pickle-like files."""
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        records = _zip_records(path)
        if records is None:
            raise ModelLoadError(f"{path.name} is a zip file but not a PyTorch archive")
        names = set(records)
        if "constants.pkl" in names or any(n.startswith("code/") for n in names):
            return "torchscript"
        if "archive_format" in names or any(n.startswith("models/") for n in names):
            return "export"
        if "data.pkl" in names:
            return "state_dict"
        raise ModelLoadError(
            f"{path.name} is a zip archive that is neither TorchScript, torch.export nor torch.save output"
        )
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"\x80") or path.suffix.lower() in _PICKLE_EXTS:
        return "state_dict"
    if path.suffix.lower() == ".safetensors":
        return "safetensors"
    raise ModelLoadError(
        f"{path.name} is not a model file this service reads; upload TorchScript (torch.jit.save), "
        "torch.export (.pt2), a state_dict (torch.save(model.state_dict()), .pt/.pth) or safetensors"
    )


def _zip_records(path: Path) -> list[str] | None:
    """Record names as PyTorch's own zip reader sees them (no top-level folder)."""
    try:
        return list(torch._C.PyTorchFileReader(str(path)).get_all_records())
    except Exception:
        return None


def _normalization(normalize: Any) -> tuple[Stats, Stats] | None:
    if normalize is None or (isinstance(normalize, str) and normalize.strip().lower() in ("", "none")):
        return None
    if isinstance(normalize, str):
        return parse_normalize(normalize)
    try:
        mean, std = (tuple(float(v) for v in part) for part in normalize)
    except (TypeError, ValueError):
        raise ConfigError(
            f"normalize must be 'mean;std', a dataset name or (mean, std), got {normalize!r}"
        ) from None
    return parse_normalize(f"{','.join(map(str, mean))};{','.join(map(str, std))}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# ---------------------------------------------------------------- TorchScript, safetensors, pickle


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice is not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path.name} as TorchScript: {_first_line(exc)}") from exc


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path.name} as safetensors: {_first_line(exc)}") from exc


def _weights_only_load(source: str | io.BytesIO, name: str) -> Any:
    """``torch.load`` that never executes pickled code; a refusal says how to re-save the file."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "global" in text.lower():
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" (it references {found.group(1)})" if found else ""
            raise ModelLoadError(f"{name}: {_REFUSED}{what}") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = detail.group(1) if detail else _first_line(exc)
        raise ModelLoadError(
            f"{name} is not a readable PyTorch checkpoint (corrupt or not a model: {reason})"
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{name} is not a readable PyTorch file: {_first_line(exc)}") from None


def _load_pickle(path: Path) -> Any:
    return _weights_only_load(str(path), path.name)


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, depth: int = 0) -> dict[str, Tensor]:
    """The tensor dict inside the usual checkpoint containers (see ``STATE_DICT_KEYS``)."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if depth < 4:
        if isinstance(obj, Mapping):
            for key in STATE_DICT_KEYS:
                if key in obj:
                    return _find_state_dict(obj[key], depth + 1)
        elif isinstance(obj, (list, tuple)) and obj:
            # convex_adversarial / OVAL checkpoints keep a list (a cascade) of state dicts.
            return _find_state_dict(obj[0], depth + 1)
    if isinstance(obj, Mapping):
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise ModelLoadError(
            f"no state dict found in the checkpoint (top-level keys: {keys}); expected a dict of "
            f"tensors, possibly under one of {', '.join(STATE_DICT_KEYS)}"
        )
    raise ModelLoadError(
        f"the checkpoint holds a {type(obj).__name__}, not a state dict; save torch.save(model.state_dict())"
    )


def _clean_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undo DataParallel's ``module.`` prefix; drop the TRADES WRN's unused ``sub_block1``."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.startswith("sub_block1."):
            continue
        out[key] = value
    return out


def _last_matrix(sd: Mapping[str, Tensor]) -> tuple[str, Tensor] | None:
    for key, value in reversed(list(sd.items())):
        if value.dim() == 2:
            return key, value
    return None


def _build_from_state_dict(sd: dict[str, Tensor], arch: str | None, num_classes: int | None) -> nn.Module:
    known = ", ".join(list_models())
    if not arch:
        raise ModelLoadError(
            f"a state dict holds only weights: name its architecture (--teacher-arch); known: {known}"
        )
    head = _last_matrix(sd)
    if num_classes is None:
        if head is None:
            raise ModelLoadError("cannot infer the number of classes (no 2-D weight); pass the dataset")
        num_classes = int(head[1].shape[0])
    try:
        model = create_model(arch, num_classes)
    except ConfigError as exc:
        raise ModelLoadError(f"cannot build teacher architecture {arch!r}: {exc}") from None

    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        problems = []
        model_head = _last_matrix(expected)
        if model_head is not None and model_head[0] in sd and sd[model_head[0]].dim() == 2:
            k_ckpt = int(sd[model_head[0]].shape[0])
            if k_ckpt != num_classes:
                problems.append(
                    f"the checkpoint has {k_ckpt} output classes but the dataset has {num_classes}"
                )
        if missing:
            problems.append(f"missing keys {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches {_few(shapes)}")
        raise ModelLoadError(
            f"the checkpoint does not fit architecture {arch!r}: {'; '.join(problems)}. "
            f"Pick the architecture it was trained with (known: {known}) and the matching dataset"
        )
    for key, value in expected.items():
        if sd[key].dtype.is_floating_point != value.dtype.is_floating_point:
            raise ModelLoadError(f"{key} has dtype {sd[key].dtype} but the model expects {value.dtype}")
    model.load_state_dict(sd, strict=True)
    return model


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"{shown} (+{len(items) - n} more)" if len(items) > n else shown


# ---------------------------------------------------------------- torch.export archives

_OPERATOR_FUNCS = {
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_",
}  # fmt: skip
_HIGHER_ORDER = {"cond", "while_loop", "map_impl", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Mod", "Abs", "Eq", "Ne", "Lt", "Le", "Gt",
    "Ge", "And", "Or", "Not", "Piecewise", "True", "False", "oo", "sqrt", "floor", "ceiling",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero",
}  # fmt: skip
_EXPR_TOKEN = re.compile(
    r"\s+|'[A-Za-z0-9_]*'|\"[A-Za-z0-9_]*\"|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z_][A-Za-z0-9_]*"
    r"|\*\*|//|==|!=|<=|>=|[-+*/%(),=<>&|~]"
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.@]*$")  # "@n" marks a repeated module call
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NAME_KEYS = {"parameter_name", "buffer_name", "tensor_constant_name", "custom_obj_name", "fqn"}


def _sympy_function_names() -> set[str]:
    from torch.utils._sympy import functions

    return {n for n in dir(functions) if n[:1].isupper() and "__" not in n}


def _target_allowed(target: str) -> bool:
    if target.startswith(("torch.ops.aten.", "torch.ops.prims.")):
        return "__" not in target
    module, _, name = target.rpartition(".")
    if module == "_operator":
        return name in _OPERATOR_FUNCS
    if module == "torch":
        return name.startswith("sym_")
    if module == "math":
        return name in {"ceil", "floor", "trunc", "sqrt"}
    if module == "torch.ops.higher_order":
        return name in _HIGHER_ORDER
    return False


def _expr_allowed(expr: str, names: set[str]) -> bool:
    """Symbolic sizes are parsed with ``sympy.sympify`` (an ``eval``): allow only arithmetic on symbols."""
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            return False
        tok = m.group(0)
        if (tok[0].isalpha() or tok[0] == "_") and not (tok in names or re.fullmatch(r"[a-z]+\d+", tok)):
            return False
        pos = m.end()
    return True


def _vet_program_json(doc: Any, where: str) -> None:
    names = _SYMPY_NAMES | _sympy_function_names()

    def refuse(what: str) -> None:
        raise ModelLoadError(f"refused: the torch.export archive {where} {what}; upload a state_dict instead")

    def walk(node: Any, key: str | None) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("target"), str) and "inputs" in node:
                if not _target_allowed(node["target"]):
                    refuse(f"calls {node['target'][:80]!r}, which is not a standard ATen operator")
            if node.get("custom_obj_values") or "as_custom_obj" in node:
                refuse("holds custom script objects")
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            if _CONTROL.search(node):
                refuse("contains control characters in its text fields")
            if key == "expr_str" and not _expr_allowed(node, names):
                refuse(f"has a symbolic expression that is not plain arithmetic: {node[:80]!r}")
            if key in _NAME_KEYS and not _SAFE_NAME.match(node):
                refuse(f"has an unusual parameter or module name {node[:80]!r}")

    if not isinstance(doc, dict) or "graph_module" not in doc:
        refuse("has no graph")
    if doc.get("guards_code"):
        refuse("carries guard code, which torch would execute")
    walk(doc, None)


def _vet_export(data: bytes, name: str) -> None:
    """Refuse any archive whose loading could run code; see the module docstring for why."""
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = list(reader.get_all_records())
    except Exception as exc:
        raise ModelLoadError(f"{name} is not a readable torch.export archive: {_first_line(exc)}") from None
    if "archive_format" not in records or reader.get_record("archive_format") != b"pt2":
        raise ModelLoadError(f"{name} is not a torch.export .pt2 archive (no archive_format 'pt2')")
    if any(r.startswith("data/aotinductor/") or r.endswith((".so", ".dll", ".dylib")) for r in records):
        raise ModelLoadError(
            f"refused: {name} contains compiled AOTInductor code; save with torch.export.save instead"
        )
    models = [r for r in records if r.startswith("models/") and r.endswith(".json")]
    if "models/model.json" not in models:
        raise ModelLoadError(f"{name} holds no exported program named 'model'; save with torch.export.save")

    raw_only: set[str] = set()
    pickled: set[str] = set()
    for rec in records:
        if not (rec.startswith("data/") and rec.endswith("_config.json")):
            continue
        folder = rec.rsplit("/", 1)[0] + "/"
        try:
            config = json.loads(reader.get_record(rec)).get("config", {})
        except (ValueError, AttributeError):
            raise ModelLoadError(f"{name}: {rec} is not valid JSON") from None
        for fqn, meta in config.items():
            path = meta.get("path_name", "") if isinstance(meta, dict) else ""
            if not _SAFE_NAME.match(str(fqn)) or not isinstance(path, str):
                raise ModelLoadError(f"refused: {name} has an unusual weight name {str(fqn)[:80]!r}")
            if folder == "data/constants/" and not path.startswith("tensor_"):
                raise ModelLoadError(f"refused: {name} holds pickled custom objects ({path[:60]!r})")
            (pickled if meta.get("use_pickle") else raw_only).add(folder + path)
    raw_only -= pickled
    for rec in records:
        if rec in raw_only or not rec.startswith("data/") or rec.endswith(".json"):
            continue
        # Every other payload is something torch would unpickle: it must pass the weights-only unpickler.
        _weights_only_load(io.BytesIO(reader.get_record(rec)), f"{name} ({rec})")
    for rec in models:
        try:
            doc = json.loads(reader.get_record(rec))
        except ValueError:
            raise ModelLoadError(f"{name}: {rec} is not valid JSON") from None
        _vet_program_json(doc, f"{name} ({rec})")


def _load_export(path: Path) -> nn.Module:
    data = path.read_bytes()  # one read: the vetted bytes are the bytes torch loads
    _vet_export(data, path.name)
    # torch.export.load would retry a failed archive through an older, unvetted format; load_pt2 does not.
    from torch.export.pt2_archive._package import load_pt2

    try:
        contents = load_pt2(io.BytesIO(data))
        program = contents.exported_programs["model"]
        return _FrozenProgram(program.module())
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load {path.name} as a torch.export program: {_first_line(exc)}"
        ) from exc
