"""TAO-style train -> prune -> retrain (QAT) -> export -> engine pipeline for Ultralytics YOLO."""

from pipeline import yolo_env as _yolo_env  # noqa: F401  (offline-safe Ultralytics, before any import of it)

__version__ = "0.1.0"
