"""Exporting a student into the formats other runtimes read, each checked by loading it back.

A student leaves a job as files a user can run without this project: safetensors (weights plus
metadata naming the architecture), TorchScript, a ``torch.export`` program (``.pt2``) and ONNX. Every
file is loaded back the way a user would (``torch.jit.load``, ``torch.export.load``, onnxruntime,
``safetensors`` + the registry model) and its logits on real test images are compared with the
in-memory model's: a format is ``ok`` only when the largest absolute difference is within
``tolerance`` and the clean accuracy on those images equals the model's. A format that cannot be
exported or fails its check is recorded with the reason (and its file removed) instead of raising, so
one exporter's limitation never fails a job.

Decisions:
- ONNX goes through ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter, at opset
  ``ONNX_OPSET`` (17, read by every current onnxruntime including mobile and web builds). It needs no
  ``onnxscript`` and exports the registry students in milliseconds; the dynamo-based exporter gave the
  same outputs but took seconds per model and pulls in onnxscript.
- TorchScript is traced (``torch.jit.trace``) on two images; tracing records batch sizes symbolically,
  and the check runs on a batch of a different size, so a program that fixed its batch is caught.
- ``torch.export`` uses a dynamic batch (``torch.export.Dim``); if a model cannot be exported that way
  it is exported for the check's batch size and the record says ``dynamic_batch: false``.
- Default tolerance 1e-4 on logits (fp32, CPU): the formats differ from eager PyTorch only by the order
  of floating-point operations (typically 1e-7 .. 1e-6 on these models).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.errors import ConfigError
from core.files import sha256_file

FORMATS = ("safetensors", "torchscript", "export", "onnx")
FILE_SUFFIXES = {
    "safetensors": ".safetensors",
    "torchscript": ".torchscript.pt",
    "export": ".pt2",
    "onnx": ".onnx",
}
ONNX_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
MAX_CHECK_IMAGES = 10_000
CHECK_BATCH = 256
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# Keys of the safetensors metadata; values are strings (safetensors stores str -> str only).
METADATA_KEYS = (
    "architecture", "num_classes", "input_range", "mean", "std", "eps", "method", "job_id", "teacher_sha256",
)


def export_file_name(prefix: str, fmt: str) -> str:
    """``{prefix}.safetensors``, ``{prefix}.torchscript.pt``, ``{prefix}.pt2`` or ``{prefix}.onnx``."""
    if fmt not in FILE_SUFFIXES:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return f"{prefix}{FILE_SUFFIXES[fmt]}"


def student_metadata(architecture: str, num_classes: int, *, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, eps: float | None = None, method: str | None = None,
                     job_id: str | None = None, teacher_sha256: str | None = None) -> dict[str, str]:
    """The safetensors metadata of a student, all strings; absent values are empty strings.

    ``mean``/``std`` are JSON lists when the model expects normalised inputs outside itself; the
    registry students take [0, 1] images directly, so they are normally empty.
    """
    return {
        "architecture": str(architecture),
        "num_classes": str(int(num_classes)),
        "input_range": "[0, 1]",
        "mean": json.dumps([float(v) for v in mean]) if mean is not None else "",
        "std": json.dumps([float(v) for v in std]) if std is not None else "",
        "eps": repr(float(eps)) if eps is not None else "",
        "method": method or "",
        "job_id": job_id or "",
        "teacher_sha256": teacher_sha256 or "",
    }


def export_student(model: nn.Module, out_dir: Path, prefix: str, *, metadata: dict[str, str],
                   images: Tensor, labels: Tensor, formats: Sequence[str] = FORMATS,
                   tolerance: float = DEFAULT_TOLERANCE) -> list[dict[str, Any]]:
    """Export ``model`` into every format in ``formats`` under ``out_dir`` and check each one.

    The model is copied to CPU, fp32, eval mode (the caller's model is not touched); it takes [0, 1]
    images NCHW (``images`` may be a Split's uint8, divided by 255 here). Each file is loaded back with
    no project code and compared with the copy on ``images``. Returns one record per format: format,
    file (name only; None when no file was kept), sha256, bytes, ok, error (why it could not be
    exported or checked), max_abs_diff, tolerance, clean_accuracy, reference_clean_accuracy, n, seconds,
    dynamic_batch. A failing format never raises; bad arguments (unknown format, non-string metadata,
    images not in [0, 1], mismatched labels) raise ConfigError.
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats or len(set(formats)) != len(formats):
        raise ConfigError(f"export formats must be distinct names from {', '.join(FORMATS)}, got {formats}")
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise ConfigError("export metadata must map strings to strings (safetensors stores only strings)")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"export tolerance must be a finite number >= 0, got {tolerance!r}")
    if not prefix or os.sep in prefix or (os.altsep and os.altsep in prefix) or prefix.startswith("."):
        raise ConfigError(f"export prefix must be a plain file name stem, got {prefix!r}")
    images, labels = _check_images(images, labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    student = copy.deepcopy(model).to("cpu", torch.float32).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    reference = _logits(student, images)
    reference_accuracy = _accuracy(reference, labels)
    return [
        _export_one(fmt, student, out_dir, prefix, metadata, images, labels, reference, reference_accuracy,
                    float(tolerance))
        for fmt in formats
    ]


def export_model_file(model_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                      arch: str | None, dataset: str, data_root: str, num_classes: int | None = None,
                      n_check: int = 256,
                      formats: Sequence[str] = FORMATS, prefix: str = "student",
                      tolerance: float = DEFAULT_TOLERANCE, eps: float | None = None,
                      method: str | None = None) -> list[dict[str, Any]]:
    """``python -m core export``: a student file (state dict, safetensors, ...) exported and checked on the
    first ``n_check`` test images of ``dataset``. Normalisation is not offered: students take [0, 1]."""
    from core.data import load_dataset
    from core.teachers import load_model_file

    if not isinstance(n_check, int) or not 1 <= n_check <= MAX_CHECK_IMAGES:
        raise ConfigError(f"n_check must be an integer in [1, {MAX_CHECK_IMAGES}], got {n_check!r}")
    for fmt in formats:
        export_file_name(prefix, fmt)  # an unknown format fails before the data is read
    data = load_dataset(dataset, data_root, val_size=0, seed=0)
    if num_classes is not None and num_classes != data.num_classes:
        raise ConfigError(f"--num-classes {num_classes} but {data.name} has {data.num_classes} classes")
    loaded = load_model_file(model_path, arch=arch, num_classes=data.num_classes,
                             input_shape=tuple(int(v) for v in data.test.x.shape[1:]))
    name = loaded.arch or arch or ""
    meta = student_metadata(name, loaded.num_classes, eps=eps, method=method)
    return export_student(loaded.model, Path(out_dir), prefix, metadata=meta, images=data.test.x[:n_check],
                          labels=data.test.y[:n_check], formats=formats, tolerance=tolerance)


# ------------------------------------------------------------------------------------------ internals


def _check_images(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise ConfigError("export check images must be a non-empty NCHW tensor")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ConfigError("export check labels must be a 1-D tensor with one label per image")
    if images.shape[0] > MAX_CHECK_IMAGES:
        raise ConfigError(f"export checks at most {MAX_CHECK_IMAGES} images, got {images.shape[0]}")
    x = images.detach().cpu()
    x = x.float().div(255) if x.dtype == torch.uint8 else x.to(torch.float32)  # a Split's uint8 images
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError("export check images must be uint8 or float in [0, 1]")
    return x.contiguous(), labels.detach().to("cpu", torch.long)


def _logits(run: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([run(images[i:i + CHECK_BATCH]).float() for i in range(0, len(images), CHECK_BATCH)])


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def _example(images: Tensor) -> Tensor:
    """Two random [0, 1] images of the check images' shape to trace with: a .pt2 stores its example
    inputs, and a user's (possibly private) images have no business inside the exported file."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand((2, *images.shape[1:]), generator=generator)


def _one_by_one(run: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.cat([run(x[i:i + 1]) for i in range(len(x))])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _export_one(fmt: str, student: nn.Module, out_dir: Path, prefix: str, metadata: dict[str, str],
                images: Tensor, labels: Tensor, reference: Tensor, reference_accuracy: float,
                tolerance: float) -> dict[str, Any]:
    started = time.perf_counter()
    name = export_file_name(prefix, fmt)
    path = out_dir / name
    # Written under its final name in a private folder (a .pt2 archive names its top folder after the
    # file), then renamed: the file appears whole or not at all.
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=out_dir))
    partial = scratch / name
    record: dict[str, Any] = {
        "format": fmt, "file": None, "sha256": None, "bytes": None, "ok": False, "error": None,
        "max_abs_diff": None, "tolerance": tolerance, "clean_accuracy": None,
        "reference_clean_accuracy": reference_accuracy, "n": int(images.shape[0]), "seconds": None,
        "dynamic_batch": None,
    }
    path.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    stage = "export"
    try:
        with warnings.catch_warnings():  # exporters' deprecation notices are not the user's concern
            warnings.simplefilter("ignore")
            record["dynamic_batch"] = _EXPORTERS[fmt](student, partial, _example(images), metadata)
            os.replace(partial, path)
            stage = "check"
            run = _LOADERS[fmt](path, student, metadata)
            if record["dynamic_batch"] is False:  # a program fixed to the example's batch of one
                run = _one_by_one(run)
            outputs = _logits(run, images)
        _compare(record, outputs, reference, labels, reference_accuracy, tolerance)
    except Exception as exc:  # one format's failure is recorded, never raised
        record["error"] = f"{stage} failed: {_first_line(exc)}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if record["ok"]:
        record.update(file=name, sha256=sha256_file(path), bytes=path.stat().st_size)
    else:
        path.unlink(missing_ok=True)
    record["seconds"] = round(time.perf_counter() - started, 4)
    return record


def _compare(record: dict[str, Any], outputs: Tensor, reference: Tensor, labels: Tensor,
             reference_accuracy: float, tolerance: float) -> None:
    if outputs.shape != reference.shape:
        record["error"] = (f"check failed: outputs have shape {tuple(outputs.shape)}, expected "
                           f"{tuple(reference.shape)}")
        return
    if not bool(torch.isfinite(outputs).all()):
        record["error"] = "check failed: the exported model's outputs are not finite"
        return
    diff = float((outputs - reference).abs().max())
    accuracy = _accuracy(outputs, labels)
    record.update(max_abs_diff=diff, clean_accuracy=accuracy)
    if diff > tolerance:
        record["error"] = (f"check failed: outputs differ from PyTorch's by {diff:.3g} > "
                           f"tolerance {tolerance:.3g}")
    elif accuracy != reference_accuracy:
        record["error"] = (f"check failed: clean accuracy {accuracy:.4f} differs from the model's "
                           f"{reference_accuracy:.4f}")
    else:
        record["ok"] = True


# --------------------------------------------------------------------------------- per-format writers


def _save_safetensors(model: nn.Module, path: Path, example: Tensor, metadata: dict[str, str]) -> bool:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=dict(metadata))
    return True  # weights have no batch size


def _save_torchscript(model: nn.Module, path: Path, example: Tensor, metadata: dict[str, str]) -> bool:
    program = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(program, str(path))
    return True  # traced sizes are symbolic; the check on a batch of another size confirms it


def _save_export(model: nn.Module, path: Path, example: Tensor, metadata: dict[str, str]) -> bool:
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        dynamic = True
    except Exception:  # some models only export for one batch size: one image, run image by image
        program = torch.export.export(model, (example[:1],))
        dynamic = False
    torch.export.save(program, str(path))
    return dynamic


def _save_onnx(model: nn.Module, path: Path, example: Tensor, metadata: dict[str, str]) -> bool:
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return True


# --------------------------------------------------------- per-format loaders (plain libraries only)


def _load_safetensors(path: Path, model: nn.Module, metadata: dict[str, str]) -> Callable[[Tensor], Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata() or {}
    if stored != metadata:
        raise ValueError("the metadata read back differs from the metadata written")
    fresh = _registry_model(metadata) or copy.deepcopy(model)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    return fresh.eval()


def _registry_model(metadata: dict[str, str]) -> nn.Module | None:
    """The architecture named in the metadata, freshly built, or None when the metadata names none."""
    arch, classes = metadata.get("architecture"), metadata.get("num_classes")
    if not arch or not classes:
        return None
    from core.models import create_model

    return create_model(arch, int(classes))


def _load_torchscript(path: Path, model: nn.Module, metadata: dict[str, str]) -> Callable[[Tensor], Tensor]:
    return torch.jit.load(str(path), map_location="cpu").eval()


def _load_export(path: Path, model: nn.Module, metadata: dict[str, str]) -> Callable[[Tensor], Tensor]:
    return torch.export.load(str(path)).module()


def _load_onnx(path: Path, model: nn.Module, metadata: dict[str, str]) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])

    return run


_EXPORTERS: dict[str, Callable[[nn.Module, Path, Tensor, dict[str, str]], bool]] = {
    "safetensors": _save_safetensors,
    "torchscript": _save_torchscript,
    "export": _save_export,
    "onnx": _save_onnx,
}
_LOADERS: dict[str, Callable[[Path, nn.Module, dict[str, str]], Callable[[Tensor], Tensor]]] = {
    "safetensors": _load_safetensors,
    "torchscript": _load_torchscript,
    "export": _load_export,
    "onnx": _load_onnx,
}
