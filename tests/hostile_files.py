"""Hostile files for the upload tests (unit and integration): bombs that declare far more than they hold,
and TorchScript models whose forward spins or asks for more memory than a check may use."""

from __future__ import annotations

import io
import zipfile

import numpy as np


def zero_bomb(images: int = 21_845) -> bytes:
    """An .npz of ``images`` black 32x32 RGB images (64 MiB for the default), deflated to about 70 KB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (images, 32, 32, 3)}
    )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(images * 3072 // 16)
            for _ in range(16):
                f.write(zeros)
        labels = io.BytesIO()
        np.save(labels, np.arange(images, dtype=np.int64) % 2)
        zf.writestr("y.npy", labels.getvalue())
    return out.getvalue()


def deflated_torch_save(extra_floats: int) -> bytes:
    """A tiny_cnn state dict plus an ignored ``sub_block1`` tensor of zeros, every member deflated."""
    import torch

    from core.models import create_model

    sd = {**create_model("tiny_cnn", 10).state_dict(), "sub_block1.big": torch.zeros(extra_floats)}
    raw = io.BytesIO()
    torch.save(sd, raw)
    raw.seek(0)
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def scripted(kind: str) -> bytes:
    """TorchScript whose forward spins (for minutes) or asks for 8 GiB."""
    import torch

    class Spin(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.flatten(1)[:, :10]
            for _ in range(1_000_000_000):
                y = y + 0.0
            return y

    class Hog(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            big = x.new_empty([2147483648])
            return x.flatten(1)[:, :10] + big.sum() * 0

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Spin() if kind == "spin" else Hog()), buf)
    return buf.getvalue()
