"""Loader for the CPU kernels in `_kernels.c`: compiled on first use, cached, called through ctypes.

Why not a torch C++ extension: compiling against the torch headers takes about a minute on two
cores; this plain C file compiles in about a second and needs only a C compiler with OpenMP.
The shared object links the same `libgomp.so.1` soname that torch has already loaded, so both
share one OpenMP runtime (no second spinning thread pool).

Anything that cannot be compiled or loaded (no compiler, another platform) makes `available()`
return False and the callers use their pure-torch path instead; set SAE_CXR_NATIVE=0 to force
that path. The cache lives in $SAE_CXR_CACHE or ~/.cache/sae_cxr and is keyed by the source,
the compiler flags and the CPU's instruction-set flags (the build uses -march=native).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SRC = Path(__file__).with_name("_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu99"]
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_INT = ctypes.c_int

_SIGNATURES = {
    "sel_topk": [_P, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _INT],
    "batch_kth": [_P, _I, _I, _I, _P, _P, _INT],
    "sel_threshold": [_P, _I, _I, _I, _P, _P, _F, _INT, _P, _P, _P, _P, _I, _I, _I, _INT],
    "dec_fwd": [_P, _P, _I, _I, _I, _P, _I, _I, _P, _I, _P, _P, _P, _P, _P, _P, _INT],
    "dec_bwd": [_P, _P, _I, _I, _I, _P, _I, _I, _P, _I, _P, _P, _P, _P, _P, _P, _INT, _INT, _INT],
    "enc_bwd": [_P, _P, _P, _I, _I, _I, _P, _I, _I, _P, _P, _INT, _INT, _INT],
    "enc_bwd_x": [_P, _P, _P, _I, _I, _I, _P, _I, _I, _P, _INT],
    "fired_update": [_P, _P, _I, _I, _I, _I, _P, _I, _INT],
    "dec_grad_post": [_P, _P, _I, _I, _I, _P, _INT],
    "member_sqnorm": [_P, _I, _I, _P, _INT],
    "renorm_rows": [_P, _I, _I, _INT],
    "add_bias": [_P, _I, _I, _P, _INT],
    "dec_fused": [_P, _P, _I, _I, _I, _P, _I, _I, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                  _INT, _INT, _INT],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("SAE_CXR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sae_cxr")
    return Path(root) / "kernels"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + _cpu_flags().encode()
                         + platform.machine().encode() + cc.encode()).hexdigest()[:16]
    out = _cache_dir() / f"sae_cxr_kernels_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *_FLAGS, str(_SRC), "-o", tmp, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {_SRC.name} failed: {proc.stderr.strip()[:2000]}")
            os.replace(tmp, out)  # atomic: concurrent builders never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None
    return lib


def available() -> bool:
    """Whether the compiled CPU kernels can be used in this process."""
    global _lib, _tried, _error
    if os.environ.get("SAE_CXR_NATIVE", "1") == "0":
        return False
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except Exception as e:  # no compiler, no OpenMP, foreign platform: fall back to torch
            _error = str(e)
            warnings.warn(f"sae_cxr: CPU transcoder kernels unavailable, using the slower torch path ({e})",
                          RuntimeWarning, stacklevel=2)
    return _lib is not None


def error() -> str | None:
    """Why the kernels are unavailable (None when they are, or were not tried)."""
    return _error


def usable(*tensors: Tensor) -> bool:
    """True when the kernels apply: all tensors on the CPU in float32 and the library loaded."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32):
            return False
    return available()


def lib() -> ctypes.CDLL:
    if not available():
        raise RuntimeError(f"CPU kernels unavailable: {_error}")
    assert _lib is not None
    return _lib


def ptr(t: Tensor | None) -> int | None:
    """Data pointer of a contiguous tensor (None for None); refuses views that would be misread."""
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("native kernel argument must be contiguous")
    return t.data_ptr()


SMALL_WORK = 1 << 21
"""Below this many elementary operations a kernel runs on one thread: forking a team costs more
than it saves, and on a shared machine a parallel region waits for its slowest (descheduled) thread."""


def nthreads(work: float = float("inf")) -> int:
    """Threads for a kernel doing about `work` operations (torch's thread count when large)."""
    return 1 if work < SMALL_WORK else max(1, torch.get_num_threads())
