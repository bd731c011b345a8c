"""Process-level settings that change speed, not results: the memory allocator and CPU devices.

A JAX training step on the CPU allocates and frees hundreds of MB of temporaries; glibc's malloc
returns them to the kernel and takes fresh (zeroed, page-faulting) pages on the next step. tcmalloc
keeps them, which speeds up the training steps of both frameworks (docs/performance.md). Like Intel's PyTorch launcher, the experiments' entry points re-execute
themselves with tcmalloc in ``LD_PRELOAD`` when it is installed (Debian: ``libtcmalloc-minimal4``);
``JAXVGG_ALLOCATOR=system`` turns that off.

XLA:CPU presents the whole host as one device. Exposing one device per core
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set by hand) lets `jaxvgg.parallel` split
small networks' batches over the cores (`parallel.auto_num_devices`); the experiments do not set it
(docs/performance.md says why).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "JAXVGG_ALLOCATOR"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
ALLOCATORS = ("tcmalloc", "system")
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for folder in LIBRARY_DIRS:
        for name in TCMALLOC_NAMES:
            path = Path(folder) / name
            if path.is_file():
                return str(path)
    return None


def allocator_in_use() -> str:
    """"tcmalloc" when it is preloaded into this process, else "system"."""
    return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"


def requested_allocator() -> str:
    """The allocator ``$JAXVGG_ALLOCATOR`` asks for (default tcmalloc)."""
    wanted = os.environ.get(ALLOCATOR_ENV, "tcmalloc") or "tcmalloc"
    if wanted not in ALLOCATORS:
        raise ValueError(f"{ALLOCATOR_ENV}={wanted!r}; expected one of {', '.join(ALLOCATORS)}")
    return wanted


def environ_with_allocator(allocator: str, environ: dict | None = None) -> dict:
    """A copy of ``environ`` (default os.environ) whose LD_PRELOAD selects ``allocator``.

    Raises:
      FileNotFoundError: tcmalloc asked for but not installed, naming the package to install.
    """
    env = dict(os.environ if environ is None else environ)
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "tcmalloc" not in p]
    if allocator == "tcmalloc":
        lib = find_tcmalloc()
        if lib is None:
            raise FileNotFoundError(f"tcmalloc not found in {', '.join(LIBRARY_DIRS)} "
                                    "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
        kept.insert(0, lib)
    elif allocator != "system":
        raise ValueError(f"unknown allocator {allocator!r}; expected one of {', '.join(ALLOCATORS)}")
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    env[ALLOCATOR_ENV] = allocator
    return env


def environ_with_cpu_devices(count: int, environ: dict | None = None) -> dict:
    """A copy of ``environ`` (default os.environ) whose XLA_FLAGS exposes ``count`` CPU devices, in place of
    any device count it had (for processes started by tests and experiments.scaling)."""
    env = dict(os.environ if environ is None else environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"])
    return env


def fast_environ(environ: dict | None = None) -> dict:
    """``environ`` (default os.environ) with the requested allocator, where installed."""
    env = dict(os.environ if environ is None else environ)
    if requested_allocator() == "tcmalloc" and find_tcmalloc() is not None:
        env = environ_with_allocator("tcmalloc", env)
    return env


def reexec_with_fast_runtime() -> None:
    """Re-executes this Python process under `fast_environ` unless it already runs under it.

    Call it first thing in a CLI's main, before jax computes anything. Nothing happens when the
    environment is already right (so it runs at most once), e.g. with ``JAXVGG_ALLOCATOR=system``.
    """
    env = fast_environ()
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
