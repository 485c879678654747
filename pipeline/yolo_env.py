"""Make Ultralytics offline-safe and quiet. The one place that knows how; imported first.

- no run-time pip installs, no requirement checks, no online checks, no analytics sync;
- its settings file lives in a folder the pipeline owns (not the user's home);
- plot fonts come from matplotlib's DejaVuSans instead of an internet download;
- a quiet console unless `verbose=true` (`set_verbose`): Ultralytics' info lines (banner, repeated
  requirement notes, its validation table), dependency FutureWarnings/UserWarnings and the pipeline's
  own detail lines (`DETAIL`) stay out of the console; the run's log.txt keeps every line.
  Progress bars stay: Ultralytics draws them while its logger is at INFO.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

_DONE = False
_VERBOSE_ENV = "PIPELINE_VERBOSE"  # "1" with verbose=true; child processes (launcher jobs) inherit it
DETAIL = {"detail": True}  # `extra=` of a log line for the run's log.txt, on the console only with verbose=true
_EPOCH_HEADER = "GPU_mem"  # the column header of Ultralytics' training progress bar: kept, the bar needs it
_DEPENDENCY_WARNINGS = (FutureWarning, UserWarning, DeprecationWarning)
# Ultralytics warnings that are expected in our use (distilling a v8/v11 model, which has no one-to-one
# head): in the run's log.txt, on the console only with verbose=true.
_EXPECTED_WARNINGS = ("This model has no one-to-one head",)


def config_dir() -> Path:
    return Path(os.environ.get("YOLO_CONFIG_DIR") or Path(tempfile.gettempdir()) / f"yolo-tao-pipeline-{os.getuid()}")


def setup() -> None:
    """Set the environment before `ultralytics` is imported; safe to call many times."""
    global _DONE
    if _DONE:
        return
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")
    os.environ.setdefault("YOLO_VERBOSE", "true")
    # OpenVINO's converter and NNCF send Google Analytics events unless a consent file in the home
    # directory says no (no environment variable turns them off; measured: 34 lookups of
    # www.google-analytics.com for one convert + quantize, each in a forked process waiting up to 3 s).
    # Both fall back to a no-op stub when `openvino_telemetry` cannot be imported, so block that import.
    sys.modules.setdefault("openvino_telemetry", None)
    cdir = config_dir()
    if not _writable(cdir / "Ultralytics"):
        # e.g. a Docker image whose build step created the folder as root: a folder of our own instead
        fallback = Path(tempfile.gettempdir()) / f"yolo-tao-pipeline-{os.getuid()}"
        cdir = fallback if _writable(fallback / "Ultralytics") else Path(tempfile.mkdtemp(prefix="yolo-tao-pipeline-"))
        _writable(cdir / "Ultralytics")
    os.environ["YOLO_CONFIG_DIR"] = str(cdir)
    # Ultralytics keeps its settings and fonts (and its DDP scripts) in <YOLO_CONFIG_DIR>/Ultralytics.
    _install_fonts(cdir / "Ultralytics")
    _DONE = True


def verbose() -> bool:
    """Whether the console shows everything (`verbose=true`)."""
    return os.environ.get(_VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    """Apply the top-level `verbose` key to the console: call after logging is configured (Hydra's)."""
    import warnings

    os.environ[_VERBOSE_ENV] = "1" if on else "0"
    # Filters of another module's warnings (the library's, not a pipeline call site); inserted first,
    # so the later call wins when a process sets verbose twice (tests).
    for category in _DEPENDENCY_WARNINGS:
        warnings.filterwarnings("default" if on else "ignore", category=category, module=r"(?!pipeline|stages)")
    # torch's own handler prints these (e.g. cpp_extension's "No CUDA runtime is found" when ModelOpt
    # loads); torch resets the level of its top logger when its logging is initialised, not the child's.
    for name in ("torch", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.NOTSET if on else logging.ERROR)
    from ultralytics.utils import LOGGER  # its console handler exists from this import on

    for handler in [*LOGGER.handlers, *logging.getLogger().handlers]:
        if type(handler) is logging.StreamHandler and _console_filter not in handler.filters:
            handler.addFilter(_console_filter)


def _console_filter(record: logging.LogRecord) -> bool:
    """A console handler's filter: without verbose, warnings and the pipeline's own lines only."""
    if verbose():
        return True
    if record.levelno >= logging.WARNING:
        return not (record.name.startswith("ultralytics") and record.getMessage().startswith(_EXPECTED_WARNINGS))
    if record.name.startswith("ultralytics"):
        return _EPOCH_HEADER in record.getMessage()
    return not getattr(record, "detail", False)


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """A library's print() calls inside (ModelOpt's "Inserted N quantizers") go to the run's log.txt,
    and to the console only with verbose=true."""
    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logging.getLogger("pipeline").info(line, extra=DETAIL)


def _writable(folder: Path) -> bool:
    """Create `folder` if needed and check that this user can write in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def _install_fonts(cdir: Path) -> None:
    missing = [n for n in ("Arial.ttf", "Arial.Unicode.ttf") if not (cdir / n).exists()]
    if not missing:
        return
    try:
        import matplotlib

        src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    except ImportError:
        return
    for name in missing:
        if src.exists():
            tmp = cdir / f".{name}.tmp{os.getpid()}"
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, cdir / name)
            except OSError:  # plots then use Ultralytics' own font lookup; nothing else depends on it
                return


setup()
