"""Output paths checked before any work, and files written atomically (arrays, and image grids of samples:
:func:`mosaic`, :func:`save_grid`).

A run that takes an hour must not die at the end on a path that was wrong from the start, and a crash while
writing must not leave half a file under the final name: :func:`check_output_file` / :func:`check_output_dir`
run before the work, :func:`atomic_write` writes beside the target and renames it into place.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

__all__ = ["atomic_write", "check_output_dir", "check_output_file", "mosaic", "save_grid"]


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder``: the only check that sees read-only mounts, ACLs and quotas."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fewstep-probe-", dir=folder)
    except OSError as err:
        raise ValueError(f"cannot write {what}: folder {folder} is not writable ({err.strerror})") from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str | os.PathLike, suffixes: Sequence[str]) -> Path:
    """``path`` as a :class:`Path` if a file with one of ``suffixes`` can be written there; ``ValueError``
    otherwise (wrong suffix, missing or read-only folder, a folder under a file, an existing folder)."""
    out = Path(path)
    if out.suffix not in suffixes:
        raise ValueError(f"output {out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; name a file ending in {' or '.join(suffixes)}")
    parent = out.parent
    if not parent.exists():
        raise ValueError(f"cannot write {out}: folder {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"cannot write {out}: {parent} is not a folder")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"cannot write {out}: the file is read-only")
    _probe_writable(parent, str(out))
    return out


def check_output_dir(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path` if it is a writable folder or can be created as one (its parent exists);
    ``ValueError`` otherwise. Creates nothing."""
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"output folder {out} is a file")
        _probe_writable(out, f"into {out}")
        return out
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create output folder {out}: {parent} is not an existing folder")
    _probe_writable(parent, f"folder {out}")
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, then rename it onto ``path``:
    readers see the old file or the whole new one, never a part; on any error the temporary file is removed."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def mosaic(samples: torch.Tensor, *, cols: int | None = None, scale: int = 4) -> np.ndarray:
    """Samples in [-1, 1] as one uint8 image: ``cols`` per row (default: square), 1-pixel white gutters, upscaled
    ``scale`` x by pixel repetition. ``(B, 1, H, W)`` gives a greyscale ``(h, w)`` array, ``(B, 3, H, W)`` an RGB
    ``(h, w, 3)`` one; other channel counts (latents) have no image and raise ``ValueError``."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"an image grid needs samples of shape (B, 1 or 3, H, W), got {tuple(samples.shape)} "
                         "(save latents as .npz, or decode them first)")
    n, channels = samples.shape[:2]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    imgs = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    imgs = imgs.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    h, w = imgs.shape[1:3]
    out = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, channels), 255, np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, cols)
        out[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = img
    out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out[..., 0] if channels == 1 else out


def save_grid(path: str | os.PathLike, samples: torch.Tensor, *, scale: int = 4) -> Path:
    """Samples in [-1, 1] (``(B, 1 or 3, H, W)``) as one PNG image grid (:func:`mosaic`,
    upscaled ``scale`` x), written atomically."""
    from PIL import Image  # imported here: only image grids need it

    image = Image.fromarray(mosaic(samples, scale=scale))
    return atomic_write(path, lambda f: image.save(f, format="PNG"))
