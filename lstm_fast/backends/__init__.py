"""Backend registry and the automatic choice.

Each backend lives in its own module, cheap to import: its heavy dependency
(numba, triton, the compiled extension) is imported by is_available(), so a
missing one only disables that backend.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

from .base import Backend, LayerSizes

log = logging.getLogger("lstm_fast")

# name -> (module, class). Importing the module must not import heavy deps;
# is_available() does that.
_SPECS = {
    "reference": ("lstm_fast.backends.reference", "ReferenceBackend"),
    "numba": ("lstm_fast.backends.numba.backend", "NumbaBackend"),
    "cpp": ("lstm_fast.backends.compiled", "CppBackend"),
    "cuda": ("lstm_fast.backends.compiled", "CudaBackend"),
    "triton": ("lstm_fast.backends.triton_gpu", "TritonBackend"),
}
BACKEND_NAMES = tuple(_SPECS)

# Automatic choice: the first backend in this order that is available and
# supports the call. CPU: cpp before numba because bench/reports/cpu-amd-epyc-2c
# (python -m bench --quick, 2-core AMD EPYC) timed cpp faster in 14 of 15 fp32
# rows and within 2% in the last (T100 B32 H256 inference); geomean vs oneDNN
# 1.27x inference / 1.21x training, numba 1.15x / 1.09x.
# GPU: the designed order, not yet measured (no GPU report).
AUTO_ORDER = {
    "cpu": ("cpp", "numba", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_instances: dict[str, Backend] = {}
# is_available() per backend, asked once per process: the answer depends on imports,
# the compiled extension and the visible devices, none of which change; and a cached
# answer is a plain lookup that torch.compile can trace through.
_availability: dict[str, tuple[bool, str]] = {}
_logged_choices: set = set()


class _Unloadable(Backend):
    def __init__(self, name, reason):
        self.name, self.reason = name, reason

    def is_available(self):
        return False, self.reason

    def supports(self, device, dtype, sizes):
        return False, self.reason


def _load(name: str) -> Backend:
    module, cls = _SPECS[name]
    try:
        return getattr(importlib.import_module(module), cls)()
    except Exception as exc:  # a broken optional backend must not break the package
        return _Unloadable(name, f"failed to load {module}: {type(exc).__name__}: {exc}")


def get_backend(name: str) -> Backend:
    if name not in _SPECS:
        raise ValueError(f"unknown lstm_fast backend {name!r}; choose one of {', '.join(BACKEND_NAMES)} or 'auto'")
    if name not in _instances:
        _instances[name] = _load(name)
    return _instances[name]


def _probe(name: str) -> tuple[bool, str]:
    """is_available() of one backend, asked once: imports its dependencies, loads or
    builds the extension. Marked as dynamo's assume_constant_result (the attribute that
    decorator sets, without importing torch._dynamo here): torch.compile runs it
    at trace time and keeps the answer as a constant, instead of failing on the
    imports and locks inside when a compiled function is the first to use lstm_fast.
    The cache is filled in here, where dynamo does not look: a cache test in traced
    code would take another path when dynamo restarts its analysis of a frame."""
    known = _availability.get(name)
    if known is None:
        known = _availability[name] = get_backend(name).is_available()
    return known


_probe._dynamo_marked_constant = True

# The backend objects exist from import on (their modules are cheap to import), so
# code traced by torch.compile only looks them up.
for _name in BACKEND_NAMES:
    get_backend(_name)


_is_available = _probe


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every backend with (available, reason)."""
    return {name: _is_available(name) for name in BACKEND_NAMES}


def default_backend_name() -> str:
    return os.environ.get("LSTM_FAST_BACKEND", "auto") or "auto"


def select_backend(name: str | None, device: torch.device, dtype: torch.dtype, sizes: LayerSizes) -> Backend:
    """Resolve a backend name ('auto', None or a registry name) for one call.

    A named backend that cannot serve the call raises with its reason; there
    is no silent substitution.
    """
    name = name or default_backend_name()
    if name != "auto":
        backend = get_backend(name)
        ok, why = _is_available(name)
        if not ok:
            raise RuntimeError(f"lstm_fast backend '{name}' is not available: {why}")
        ok, why = backend.supports(device, dtype, sizes)
        if not ok:
            raise RuntimeError(f"lstm_fast backend '{name}' does not support this call: {why}")
        return backend
    reasons = []
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        backend = get_backend(candidate)
        ok, why = _is_available(candidate)
        if ok:
            ok, why = backend.supports(device, dtype, sizes)
        if ok:
            key = (candidate, device.type, dtype)
            if key not in _logged_choices and not torch.compiler.is_compiling():
                _logged_choices.add(key)
                log.debug("lstm_fast: backend %s chosen for %s %s", candidate, device.type, dtype)
            return backend
        reasons.append(f"{candidate}: {why}")
    # The reference backend supports every floating dtype on every device, so
    # this is reached only for non-floating input.
    raise RuntimeError("no lstm_fast backend supports this call (" + "; ".join(reasons) + ")")
