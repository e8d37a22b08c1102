"""The compiled CIFG kernel (`cifg_kernel.cpp`): built once per machine, then loaded from a cache.

Built with the machine's C++ compiler against the installed torch, into
$FEDKB_BUILD_DIR or ~/.cache/fedkeyboard/build; torch rebuilds it when the source
changes. Training falls back to the Python walk in model.py (same results; the walk
about a quarter slower, a training step about a tenth) when no compiler is available,
and says so once.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

_NAME = "fedkeyboard_cifg"


def build_dir() -> Path:
    configured = os.environ.get("FEDKB_BUILD_DIR")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "fedkeyboard" / "build" / f"torch-{torch.__version__}"


@functools.cache
def cifg_kernel() -> ModuleType | None:
    """The compiled module (with `forward` and `backward`), or None if it cannot be built here."""
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob(f"{_NAME}*.so")):
        print("building the C++ CIFG training kernel, once for this machine (about 20 s)...", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            name=_NAME,
            sources=[str(Path(__file__).with_name("cifg_kernel.cpp"))],
            build_directory=str(folder),
            extra_cflags=["-O3"],
        )
    except (OSError, RuntimeError, ImportError) as error:
        warnings.warn(f"training uses the slower Python CIFG walk: the C++ kernel did not build ({error})", stacklevel=2)
        return None
