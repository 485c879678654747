"""Make Ultralytics offline-safe and quiet. The one place that knows how; imported first.

- no run-time pip installs, no requirement checks, no online checks, no analytics sync;
- its settings file lives in a folder the pipeline owns (not the user's home);
- plot fonts come from matplotlib's DejaVuSans instead of an internet download.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

_DONE = False


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
    os.environ["YOLO_CONFIG_DIR"] = str(cdir)
    # Ultralytics keeps its settings and fonts in <YOLO_CONFIG_DIR>/Ultralytics.
    (cdir / "Ultralytics").mkdir(parents=True, exist_ok=True)
    _install_fonts(cdir / "Ultralytics")
    _DONE = True


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
            shutil.copyfile(src, tmp)
            os.replace(tmp, cdir / name)


setup()
