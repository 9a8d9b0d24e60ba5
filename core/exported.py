"""Reading back the files ``core.export`` writes, so ``python -m core evaluate`` re-checks a student.

TorchScript and ``.pt2`` files are already teacher formats (core.teachers). This module adds what only
exported students need: the architecture named in a safetensors file's metadata (no ``--arch`` needed),
and ONNX through onnxruntime. An ONNX model has no autograd, so it supports the clean accuracy only:
``OnnxModel`` refuses inputs that require gradients, and ``check_attacks_for_format`` refuses a
gradient attack before any data is loaded.

ONNX is read only from the CLI's own user's local files (``load_model_file(..., allow_onnx=True)``), never
for uploaded teachers; even so, a model that points at external data files is refused: the session is
built from the file's bytes alone and touches no other file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from core.errors import ConfigError, ModelLoadError

ONNX_ATTACKS = ("clean",)
ONNX_ONLY_CLEAN = (
    "gradient attacks need a PyTorch format (.pt2, .torchscript.pt, .safetensors); "
    "ONNX supports attacks=clean"
)
# safetensors metadata is trusted for the architecture and normalisation only when core.export wrote it.
EXPORT_MARKER = ("input_range", "[0, 1]")


class OnnxModel(nn.Module):
    """An onnxruntime session (CPU) behind ``nn.Module``'s call, for forward passes without gradients."""

    supports_gradients = False

    def __init__(self, data: bytes, num_params: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.num_params = num_params

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise ConfigError(ONNX_ONLY_CLEAN)
        out = self.session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def load_onnx(path: Path) -> OnnxModel:
    """An ONNX file as an ``OnnxModel``; external data (other files) is refused."""
    import onnx

    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path.name} as ONNX: {type(exc).__name__}: {exc}") from exc
    initializers = list(proto.graph.initializer)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in initializers):
        raise ModelLoadError(f"{path.name} keeps weights in external files; export it as one .onnx file")
    num_params = 0
    for t in initializers:
        size = 1
        for d in t.dims:
            size *= int(d)
        num_params += size
    try:
        return OnnxModel(data, num_params)
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot load {path.name}: {type(exc).__name__}: {exc}") from exc


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata ``core.export`` wrote into a safetensors header; {} for any other file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # the weights loader reports an unreadable file with its own message
        return {}
    return meta if meta.get(EXPORT_MARKER[0]) == EXPORT_MARKER[1] else {}


def metadata_normalize(meta: dict[str, str]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from metadata written by ``core.export.student_metadata``, or None when absent."""
    mean, std = meta.get("mean") or "", meta.get("std") or ""
    if not mean or not std:
        return None
    try:
        return tuple(float(v) for v in json.loads(mean)), tuple(float(v) for v in json.loads(std))
    except (ValueError, TypeError):
        raise ModelLoadError(f"the file's metadata has unreadable mean/std: {mean!r}, {std!r}") from None


def is_onnx_request(path: str | Path, fmt: str) -> bool:
    fmt = (fmt or "auto").strip().lower()
    return fmt == "onnx" or (fmt == "auto" and Path(path).suffix.lower() == ".onnx")


def check_attacks_for_format(path: str | Path, fmt: str, attacks: Sequence[str]) -> None:
    """Refuse gradient attacks on an ONNX model before any data is loaded."""
    if is_onnx_request(path, fmt) and any(a not in ONNX_ATTACKS for a in attacks):
        raise ConfigError(ONNX_ONLY_CLEAN)
