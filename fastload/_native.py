"""Loading of the C++ libraries built from ``csrc/<name>/`` by ``setup.py``.

They are plain C-ABI shared objects called through ``ctypes``: ctypes drops the GIL for
the duration of every call, and the build never needs torch. Each library exports
``fl_last_error()`` (a thread-local message) for calls that return a non-zero status.

``FASTLOAD_NATIVE_DIR`` (a folder) loads the libraries from there instead of the package:
the sanitizer job (.ci/sanitize) points it at the ASan/UBSan build.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL:
    """Return the ctypes handle of ``fastload/_<name>.so``, with a clear error if absent."""
    where = os.environ.get("FASTLOAD_NATIVE_DIR") or _HERE
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(where, f"_{name}{suffix}")
        if os.path.exists(path):
            lib = ctypes.CDLL(path)
            lib.fl_last_error.restype = ctypes.c_char_p
            lib.fl_last_error.argtypes = []
            return lib
    raise ImportError(
        f"fastload's native library '_{name}' is not built (looked in {where}). "
        "Install the package with `pip install -e .` (or `python setup.py build_ext --inplace`)."
    )


def check(lib: ctypes.CDLL, status: int, what: str) -> None:
    """Raise the library's last error if ``status`` is non-zero."""
    if status != 0:
        msg = lib.fl_last_error()
        raise RuntimeError(f"{what}: {msg.decode('utf-8', 'replace') if msg else f'status {status}'}")


def ptr(t) -> ctypes.c_void_p:
    """Data pointer of a torch tensor or numpy array (which must stay alive during the call)."""
    if hasattr(t, "data_ptr"):
        return ctypes.c_void_p(t.data_ptr())
    return ctypes.c_void_p(t.ctypes.data)
