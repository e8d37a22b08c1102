"""The compiled CIFG kernel (`cifg_kernel.cpp`): built once per environment, then loaded from a cache.

Built with the machine's C++ compiler against the installed torch, into
$FEDKB_BUILD_DIR or a folder of ~/.cache/fedkeyboard/build named for everything the
build depends on (`build_dir`). Training falls back to the Python walk in model.py
(same results; the walk about a quarter slower, a training step about a tenth) when
no compiler is available, and says so once.

Every process that trains loads the kernel (each worker of the local pool, each Ray
worker), and any of them can be killed at any moment (the pool ends its workers when a
run stops). So the folder is guarded by an OS file lock (`filelock`), which dies with
its holder, and a library already built is imported directly. torch's own guard, a
lock *file* that `cpp_extension.load` creates and deletes around a ninja run in every
process, outlived a worker killed inside that run, and from then on every new process
that trained waited for it forever (the suite hung so in CI).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock
from torch.utils import cpp_extension

_NAME = "fedkeyboard_cifg"
_SOURCE = Path(__file__).with_name("cifg_kernel.cpp")
_CFLAGS = ("-O3",)


def build_dir() -> Path:
    """$FEDKB_BUILD_DIR, or a cache folder of its own for each set of inputs the build depends on.

    torch's build writes the source's path, the include paths of this torch and Python, the
    compiler and its flags into the folder's ninja file, and rebuilds when any of them differs
    from the last build there. A folder named for the torch version alone was therefore shared by
    every environment with that version (another clone's .venv): each rebuilt it for itself in
    turn, and a run that met a rebuild paid 45 to 113 s in its first round. The name now hashes
    all of them, and the source's bytes.
    """
    configured = os.environ.get("FEDKB_BUILD_DIR")
    if configured:
        return Path(configured)
    inputs = [
        hashlib.sha256(_SOURCE.read_bytes()).hexdigest(), str(_SOURCE.resolve()),
        torch.__version__, str(Path(torch.__file__).resolve().parent),
        sys.version, sys.prefix, os.environ.get("CXX", "c++"), *_CFLAGS,
    ]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "fedkeyboard" / "build" / f"torch-{torch.__version__}-{key}"


@functools.cache
def cifg_kernel() -> ModuleType | None:
    """The compiled module (with `forward` and `backward`), or None if it cannot be built here."""
    folder = build_dir()
    library = folder / f"{_NAME}.so"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(folder / "build.lock"):
            if library.exists():
                try:
                    return _import(library)
                except ImportError:
                    library.unlink()  # a build killed while linking: build it again
            print("building the C++ CIFG training kernel, once for this environment (about 20 s)...",
                  file=sys.stderr, flush=True)
            # torch's lock file, if here, was left by a process killed inside cpp_extension.load: with the lock
            # above held, no other process is inside it now.
            (folder / "lock").unlink(missing_ok=True)
            return cpp_extension.load(
                name=_NAME,
                sources=[str(_SOURCE)],
                build_directory=str(folder),
                extra_cflags=list(_CFLAGS),
            )
    except (OSError, RuntimeError, ImportError) as error:
        warnings.warn(f"training uses the slower Python CIFG walk: the C++ kernel did not build ({error})",
                      stacklevel=2)
        return None


def _import(library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
