"""Device and numeric-precision choices shared by extraction and fine-tuning."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading

import torch

from cnncodes._choices import PRECISIONS
from cnncodes._errors import CnnCodesError, InvalidParameterError



def resolve_device(device) -> torch.device:
    """``"auto"``/None -> CUDA when present, else CPU; a named device is checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidParameterError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CnnCodesError(f"device {device!r} was asked for but CUDA is not available here; use device='cpu'.")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where autocast pays."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:  # pragma: no cover - probe unavailable in this build
            pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into the fastest precision this device runs without a silent loss.

    ``"auto"`` is bfloat16 autocast on a CUDA GPU that supports it and on a CPU with native
    bfloat16 instructions, float32 elsewhere. float16 is offered on CUDA only: on a CPU it is
    emulated and slower than float32.
    """
    if precision not in PRECISIONS:
        raise InvalidParameterError(f"unknown precision {precision!r}. Valid precisions: {', '.join(PRECISIONS)}.")
    if precision == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if device.type == "cpu" and cpu_has_fast_bf16() else "float32"
    if precision == "float16" and device.type != "cuda":
        raise CnnCodesError("precision 'float16' needs a CUDA device; on a CPU use 'bfloat16' or 'float32'.")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for float32)."""
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- glibc malloc

# mallopt parameters (malloc.h) and glibc's defaults, restored afterwards.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_UP_TO = 2**31 - 1  # bytes of free memory at the heap's top kept for reuse (mallopt takes an int)
# Seconds the setting outlives its last user before the free memory goes back to the system
# (jemalloc's default decay is 10 s too): calls in quick succession (a re-run, a grid search
# over a CNNCodes pipeline) find their activations' memory still there instead of faulting
# it in again. 0 gives it back at once.
RELEASE_AFTER_SECONDS = 10.0
_malloc_users = 0
_malloc_kept = False  # the setting is on: users are running, or the release is pending
_release_timer: threading.Timer | None = None
_malloc_lock = threading.Lock()


def _glibc():
    """The process's glibc (for mallopt and malloc_trim), or None on other C libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # present in glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the memory kept by :func:`reuse_freed_memory` back now (no-op while it runs)."""
    global _malloc_kept, _release_timer
    libc = _glibc()
    with _malloc_lock:
        if libc is None or _malloc_users or not _malloc_kept:
            return
        if _release_timer is not None:
            _release_timer.cancel()
            _release_timer = None
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
        _malloc_kept = False


@contextlib.contextmanager
def reuse_freed_memory():
    """Let glibc keep freed memory for reuse while the block runs, then give it back.

    A forward pass frees and allocates the same large activation buffers at every batch.
    By default glibc serves blocks above its mmap threshold (at most 32 MB) with a fresh
    ``mmap`` and unmaps them when freed, so every batch faults its activations in again,
    page by page: extracting flowers5 with MobileNetV2 on 2 cores spent more time in the
    kernel (43 s of system time, 26 million page faults) than computing (37 s). Inside this
    block large blocks come from the heap and freed memory stays there (what jemalloc or
    tcmalloc would do): 0.3 million faults, 1 s of system time, that run 2.9x faster.
    ``RELEASE_AFTER_SECONDS`` after the last block ends (unless another begins), glibc's
    default limits come back and ``malloc_trim`` returns the free memory to the system
    (:func:`release_freed_memory` does it at once). Nested and concurrent uses share one
    setting; a no-op outside glibc.
    """
    global _malloc_users, _malloc_kept, _release_timer
    libc = _glibc()
    if libc is None:
        yield
        return
    with _malloc_lock:
        if _release_timer is not None:
            _release_timer.cancel()
            _release_timer = None
        if not _malloc_kept:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO)
            _malloc_kept = True
        _malloc_users += 1
    try:
        yield
    finally:
        with _malloc_lock:
            _malloc_users -= 1
            last = _malloc_users == 0
            if last and RELEASE_AFTER_SECONDS > 0:
                _release_timer = threading.Timer(RELEASE_AFTER_SECONDS, release_freed_memory)
                _release_timer.daemon = True  # never holds up the interpreter's exit
                _release_timer.start()
        if last and RELEASE_AFTER_SECONDS <= 0:
            release_freed_memory()
