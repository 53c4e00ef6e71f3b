"""Which backend runs a call, which can run here at all, and why not.

Precedence of a forced choice: the ``backend=`` argument, then the innermost ``use_backend``
context, then the ``CONDSEG_OPS_BACKEND`` environment variable. Without one, CUDA tensors go to
the compiled CUDA kernels, else Triton, else the reference; CPU tensors to the compiled CPU
kernels, else the reference.
"""
import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("condseg_ops")

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "CONDSEG_OPS_BACKEND"

# The innermost use_backend() choice of this thread (or asyncio task): a context variable, so that
# one thread's block never leaks into another's, whatever order they exit in.
_forced = contextvars.ContextVar("condseg_ops_forced_backend", default=None)


def _load_compiled(here=Path(__file__).resolve().parent):
    """Returns (module, None) or (None, why it is missing); ``here`` is this package's folder."""
    try:
        return importlib.import_module("condseg_ops._C"), None
    except ImportError as error:
        installed = None if any(here.glob("_C*")) else _shadowed_install(here)  # else _C itself is broken
        if installed is not None:
            return None, (f"condseg_ops was imported from {here}, a source folder without the compiled "
                          f"extension ({error}), which hides the installed build in {installed} (Python looks "
                          "in the current folder first): run from another folder, or build in place with "
                          "`python setup.py build_ext --inplace`")
        return None, (f"the compiled extension condseg_ops._C is not built ({error}); "
                      "reinstall with `pip install --no-build-isolation .`")


def _shadowed_install(here):
    """The folder of an installed condseg_ops that has the compiled extension, when it is not
    ``here``, the one imported (a source checkout on the path hides it), else None."""
    try:  # only a better message: nothing here may break the import
        # every "condseg" on the path: a checkout's own condseg.egg-info comes first from inside it
        for dist in importlib.metadata.distributions():
            if dist.metadata["Name"] != "condseg":
                continue
            installed = Path(dist.locate_file("condseg_ops"))
            if installed.is_dir() and installed.resolve() != here and any(installed.glob("_C*")):
                return installed
    except Exception:  # noqa: BLE001 - a broken distribution on the path
        return None
    return None


COMPILED, COMPILED_ERROR = _load_compiled()


def build_info():
    """How condseg_ops._C was built (backends, CUDA architectures, torch, compiler), or None."""
    return dict(COMPILED.build_info) if COMPILED is not None else None


@functools.lru_cache(maxsize=None)
def _load_triton():
    """The Triton kernels module, imported on first use (importing triton is slow): returns
    (module, None) or (None, why it cannot be loaded). Any error counts: an older
    Triton without a GPU driver fails with a RuntimeError while the kernels are decorated."""
    try:
        return importlib.import_module("condseg_ops.triton_kernels"), None
    except Exception as error:  # noqa: BLE001 - reported as the backend's reason
        return None, f"the Triton backend could not be loaded ({type(error).__name__}: {error})"


def _triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(name, device_type):
    """None when backend ``name`` can run tensors of ``device_type`` here, else the reason."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {BACKENDS}"
    if name == "reference":
        return None
    if name == "triton":
        module, error = _load_triton()
        if module is None:
            return error
        if not module.TRITON_AVAILABLE:
            return module.TRITON_UNAVAILABLE_REASON
        if device_type != "cuda" and not (device_type == "cpu" and _triton_interpreted()):
            return f"Triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device_type}"
        return None
    if COMPILED is None:
        return COMPILED_ERROR
    if name == "cpu" and device_type != "cpu":
        return f"the compiled CPU kernels run CPU tensors, not {device_type}"
    if name == "cuda":
        if "cuda" not in COMPILED.build_info["backends"]:
            return ("condseg_ops._C was built without CUDA kernels (no CUDA toolkit or a CPU-only torch "
                    "at build time)")
        if device_type != "cuda":
            return f"the compiled CUDA kernels run CUDA tensors, not {device_type}"
    return None


def available_backends(device_type=None):
    """Backends that can run here: for ``device_type`` ("cpu"/"cuda") when given, else for any."""
    types = [device_type] if device_type else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [name for name in BACKENDS if any(unavailable_reason(name, t) is None for t in types)]


def check_name(where, name):
    """Raises a ValueError naming ``where`` unless ``name`` is a backend or None (automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {BACKENDS} or None")


@contextlib.contextmanager
def use_backend(name):
    """Forces ``name`` for every call inside the block. ``None`` lifts an enclosing block's choice:
    calls then choose as outside any block (``CONDSEG_OPS_BACKEND`` still applies when set)."""
    check_name("use_backend", name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _forced_choice(argument):
    if argument is not None:
        return argument, "the backend= argument"
    forced = _forced.get()
    if forced is not None:
        return forced, "use_backend()"
    if os.environ.get(ENV_VAR, "").strip():
        return os.environ[ENV_VAR].strip().lower(), f"the {ENV_VAR} environment variable"
    return None, None


@functools.lru_cache(maxsize=None)
def _log_fallback_once(device_type, skipped, level=logging.INFO):
    logger.log(level, "condseg_ops: for %s tensors %s", device_type, skipped)


def _automatic(device_type):
    preferred = ("cuda", "triton", "reference") if device_type == "cuda" else ("cpu", "reference")
    skipped = []
    for name in preferred:
        reason = unavailable_reason(name, device_type)
        if reason is None:
            if skipped:  # the reference is many times slower than the kernels: worth a warning
                level = logging.WARNING if name == "reference" else logging.INFO
                _log_fallback_once(device_type, f"using {name!r}: " + "; ".join(skipped), level)
            return name
        skipped.append(f"{name!r} unavailable: {reason}")
    return "reference"


@torch.compiler.assume_constant_result
def _select(device_type, argument):
    name, source = _forced_choice(argument)
    if name is None:
        return _automatic(device_type)
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise RuntimeError(f"condseg_ops: backend {name!r} (forced by {source}) cannot run here: {reason}")
    return name


def select_backend(device_type, argument=None):
    """The backend a call on ``device_type`` tensors uses; raises if a forced one cannot run."""
    check_name("contrast_aggregate", argument)
    return _select(device_type, argument)
