"""Model files are pickles: read them without running code that nobody asked for.

Every `.pt` is read as `torch.load(weights_only=True)` against an allowlist, so the pipeline's own
checkpoints keep Ultralytics' format (`yolo predict` still reads them) and load as data:

- model classes (`nn.Module` subclasses defined in `torch.nn.modules`, `ultralytics.nn.modules`,
  `ultralytics.nn.tasks` and `pipeline.modules`) may only be *rebuilt* (`__new__` plus a state
  update, as pickle stores a module), never *called* nor stored as a value that code could call
  later: a constructor such as DetectionModel's parses a YAML with `eval`, so a pickle that calls
  one (directly or through torch's `_rebuild_from_type_v2`) is refused like any unknown global;
- a few data classes found in Ultralytics checkpoints may be called: IterableSimpleNamespace,
  pathlib paths and numpy scalars/dtypes (numbers in `train_metrics`).

The pickle is scanned before it is unpickled (`needs_full_unpickling`), from the same bytes that
are then loaded. A file that needs anything else (a custom class, a function call) is refused with
one line naming `trust_pickle`; a path listed there (`trust_pickle=[PATH]`, docs/model-files.md)
is loaded in full, which runs whatever code the file holds.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import pathlib
import pickletools
import threading
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import UserError

TRUST_KEY = "trust_pickle"

# Packages whose nn.Module classes a checkpoint may rebuild (never call).
MODULE_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks", "pipeline.modules")

_TRUSTED: ContextVar[frozenset[str]] = ContextVar("trusted_pickles", default=frozenset())
# torch's safe_globals context edits one process-wide set: loads take turns. (torch is imported where
# used: the runner imports this module, and `stage=report` needs no torch.)
_LOAD_LOCK = threading.Lock()
_MARK = object()
# The opcodes torch's weights-only unpickler implements (torch/_weights_only_unpickler.py); it
# refuses any other, and a full unpickle of an opcode outside this set could do more than the scan saw.
_PLAIN_OPS = {
    "NONE": 0, "NEWFALSE": 0, "NEWTRUE": 0, "EMPTY_TUPLE": 0, "EMPTY_LIST": 0, "EMPTY_DICT": 0, "EMPTY_SET": 0,
    "BININT": 0, "BININT1": 0, "BININT2": 0, "BINFLOAT": 0, "BINUNICODE": 0, "SHORT_BINSTRING": 0, "LONG1": 0,
    "APPEND": 1, "SETITEM": 2, "BUILD": 1, "BINPERSID": 1,
}  # name -> items popped; each pushes one item except APPEND, SETITEM and BUILD, which modify the one below
_TUPLE_OPS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
# torch's one allowed function that calls an argument: _rebuild_from_type_v2(func, type, args, state) runs
# func(*args), so func must be one of torch's own rebuild functions, not an allowlisted class.
_CALLS_ITS_ARGUMENT = "torch._tensor._rebuild_from_type_v2"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Global:
    """A GLOBAL on the scanned stack (what a later REDUCE or NEWOBJ acts on)."""

    name: str


@functools.cache
def _callable_data() -> dict[str, Any]:
    """Data classes and functions a checkpoint may call, by the name pickle records."""
    import numpy as np
    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar(dtype, bytes) rebuild function
    return {
        "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
        "ultralytics.yolo.utils.IterableSimpleNamespace": IterableSimpleNamespace,  # before Ultralytics 8.0.44
        "pathlib.PosixPath": pathlib.Path,  # a checkpoint written on Windows reads on Linux and back
        "pathlib.WindowsPath": pathlib.Path,
        "pathlib._local.PosixPath": pathlib.Path,  # Python 3.13 names
        "pathlib._local.WindowsPath": pathlib.Path,
        "numpy.core.multiarray.scalar": scalar,
        "numpy._core.multiarray.scalar": scalar,
        "numpy.dtype": np.dtype,
    }


@functools.cache
def _numpy_dtype_classes() -> tuple[type, ...]:
    """The classes of unpickled numpy dtypes (the weights-only unpickler checks the type it BUILDs)."""
    import numpy as np

    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
             np.float16, np.float32, np.float64)
    return tuple({type(np.dtype(k)) for k in kinds})


@functools.cache
def _module_class(name: str) -> type | None:
    """The nn.Module class pickle names `name`, when it is defined in one of MODULE_PACKAGES."""
    from torch import nn

    module, _, attr = name.rpartition(".")
    if not any(module == p or module.startswith(p + ".") for p in MODULE_PACKAGES):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module:
        return obj
    return None


def _torch_default(name: str) -> bool:
    """Globals torch's weights-only unpickler allows on its own (tensor rebuilds, dtypes, OrderedDict)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return name in _get_allowed_globals()


class _Refused(Exception):
    """Raised inside the scan with the reason a pickle needs full unpickling."""


def needs_full_unpickling(pickle_bytes: bytes) -> str | None:
    """Why a pickle needs more than the allowlist (e.g. "it references posix.system"), or None when it does not.

    The stack is followed far enough to know what each REDUCE (a call) and NEWOBJ (a rebuild) acts on:
    globals and tuples are kept, every other value is a placeholder. A model class may only be the
    target of a NEWOBJ: as a value (an argument, an element, an attribute) code could call it later.
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def values(items: Any) -> Any:
        for item in items:
            if isinstance(item, _Global) and _module_class(item.name):
                raise _Refused(f"it passes the class {item.name} as a value")
        return items

    def pop(n: int) -> tuple[Any, ...]:
        if len(stack) < n or _MARK in stack[len(stack) - n:]:
            raise _Refused("its pickle is malformed (an opcode on a short stack)")
        items = tuple(stack[len(stack) - n:])
        del stack[len(stack) - n:]
        return items

    def pop_mark() -> tuple[Any, ...]:
        if _MARK not in stack:
            raise _Refused("its pickle is malformed (no mark)")
        at = len(stack) - 1 - stack[::-1].index(_MARK)
        items = tuple(stack[at + 1:])
        del stack[at:]
        return values(items)

    try:
        for op, arg, _ in pickletools.genops(pickle_bytes):
            name = op.name
            if name == "GLOBAL":
                full = _global_name(str(arg))
                if not (_torch_default(full) or full in _callable_data() or _module_class(full)):
                    return f"it references {full}"
                stack.append(_Global(full))
            elif name == "REDUCE":
                func, args = pop(2)
                target = func.name if isinstance(func, _Global) else None
                if target is None or not (_torch_default(target) or target in _callable_data()):
                    return f"it calls {target or 'a computed function'}"
                if target == _CALLS_ITS_ARGUMENT:
                    inner = args[0] if isinstance(args, tuple) and args else None
                    if not (isinstance(inner, _Global) and _torch_default(inner.name)):
                        called = inner.name if isinstance(inner, _Global) else "a computed function"
                        return f"it calls {called} through {target}"
                stack.append(None)
            elif name == "NEWOBJ":
                cls, _args = pop(2)
                if not isinstance(cls, _Global):
                    return "it creates an object of a computed class"
                stack.append(None)
            elif name == "MARK":
                stack.append(_MARK)
            elif name in ("TUPLE", "APPENDS", "SETITEMS"):
                items = pop_mark()
                if name == "TUPLE":
                    stack.append(items)
            elif name in _TUPLE_OPS:
                stack.append(values(pop(_TUPLE_OPS[name])))
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in _PLAIN_OPS:
                values(pop(_PLAIN_OPS[name]))
                if name not in ("APPEND", "SETITEM", "BUILD"):
                    stack.append(None)
            elif name not in ("PROTO", "STOP"):
                return f"it uses the pickle opcode {name}"
    except _Refused as refused:
        return str(refused)
    except (ValueError, IndexError, KeyError) as exc:
        return f"its pickle is malformed ({exc})"
    return None


def _allowlist(names: list[str]) -> list[Any]:
    """The entries torch's weights-only unpickler needs for a pickle naming `names`: (object, name) pairs.

    Only those the file names: torch rebuilds its lookup from the registered set at every call/build opcode.
    """
    entries: list[Any] = [(obj, n) for n in names if (obj := _callable_data().get(n) or _module_class(n)) is not None]
    if "numpy.dtype" in names:
        entries += list(_numpy_dtype_classes())  # a dtype is BUILT as its own class, which no GLOBAL names
    return entries


def _globals_of(pickle_bytes: bytes) -> list[str]:
    return sorted({_global_name(str(arg)) for op, arg, _ in pickletools.genops(pickle_bytes) if op.name == "GLOBAL"})


def _global_name(arg: str) -> str:
    """"module name" of a GLOBAL opcode as torch resolves it (Python 2 names such as __builtin__ mapped)."""
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    module, _, name = arg.partition(" ")
    module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    return f"{module}.{name}"


@contextlib.contextmanager
def trusting(paths: Iterable[str | Path]) -> Iterator[None]:
    """Within the block, the files `paths` name may be unpickled in full (trust_pickle)."""
    token = _TRUSTED.set(frozenset(str(Path(str(p)).expanduser().resolve()) for p in paths))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def trust_from_config(fn: F) -> F:
    """Decorator: run `fn(cfg, ...)` trusting the files the config's trust_pickle lists."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        with trusting(cfg.get(TRUST_KEY) or ()):
            return fn(cfg, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def is_trusted(path: str | Path) -> bool:
    return str(Path(path).expanduser().resolve()) in _TRUSTED.get()


def _read_pickle(data: bytes, what: str) -> bytes:
    """data.pkl of a torch.save archive, read with torch's own zip reader (the bytes torch.load unpickles)."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    except RuntimeError:
        raise UserError(f"{what} is not a PyTorch checkpoint ({_file_kind(data)}, not a torch.save archive); "
                        "give a .pt written by this pipeline or by Ultralytics") from None
    if reader.has_record("constants.pkl") or any(r.startswith("code/") for r in reader.get_all_records()):
        raise UserError(f"{what} is a TorchScript archive, not a checkpoint; give the .pt that stage=train, "
                        "prune or retrain wrote (or an Ultralytics .pt)")
    if not reader.has_record("data.pkl"):
        raise UserError(f"{what} is a zip archive without a pickled checkpoint (data.pkl); give a .pt written by "
                        "this pipeline or by Ultralytics")
    return bytes(reader.get_record("data.pkl"))


def _file_kind(data: bytes) -> str:
    """A few words on what a file is, for messages."""
    if not data:
        return "an empty file"
    with contextlib.suppress(UnicodeDecodeError):
        data[:4096].decode("utf-8")
        return "a text file"
    return f"{len(data)} bytes of another format"


def _refusal(what: str, path: Path, reason: str) -> UserError:
    return UserError(f"{what} needs full unpickling to load ({reason}), which can run any code the file holds; "
                     f"if you trust this file, allow it with {TRUST_KEY}=[{path}]")


def check(path: str | Path, key: str | None = None) -> None:
    """Refuse a .pt that weights-only loading cannot read, unless trusted: call it before a loader that
    unpickles in full (Ultralytics' AutoBackend, YOLO(path)). `key` (e.g. "evaluate.input") is named."""
    p = Path(path)
    if is_trusted(p):
        return
    what = f"{key}={p}" if key else str(p)
    if not p.is_file():
        raise UserError(f"{what} is not a file; give the path of a .pt checkpoint")
    reason = needs_full_unpickling(_read_pickle(p.read_bytes(), what))
    if reason is not None:
        raise _refusal(what, p, reason)


def load(path: str | Path, key: str | None = None) -> Any:
    """The object a .pt holds: weights-only against the allowlist; in full only for a trusted path."""
    p = Path(path)
    what = f"{key}={p}" if key else str(p)
    data = p.read_bytes()  # scanned and loaded from the same bytes: the file cannot change in between
    if is_trusted(p):
        return _torch_load(data, what, weights_only=False)
    pickle_bytes = _read_pickle(data, what)
    reason = needs_full_unpickling(pickle_bytes)
    if reason is not None:
        raise _refusal(what, p, reason)
    import torch

    with _LOAD_LOCK, torch.serialization.safe_globals(_allowlist(_globals_of(pickle_bytes))):
        return _torch_load(data, what, weights_only=True)


def _torch_load(data: bytes, what: str, weights_only: bool) -> Any:
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # a truncated or damaged file is the user's to fix, not a bug
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{what} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first})") from None
