"""What every deployment backend shares: ONNX metadata, real images (letterboxed), fixed batches, timing, CPU facts.

Images for parity checks and INT8 calibration always come from real files (a dataset split or
`engine.calib_dir`), never from random data. They are read and letterboxed by the same code as the
predictor's (`pipeline.datasets.images`: Ultralytics' LetterBox arithmetic, grey 114 padding,
centred), RGB, CHW, scaled to 0..1. Which files (config and context) is the stages' choice
(`stages/_shared.py`); this module takes plain arguments.
"""

from __future__ import annotations

import ast
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets.images import ULTRALYTICS_SUFFIXES, letterbox, read_image
from pipeline.errors import UserError

# Ultralytics writes ONNX metadata values with str(); these keys hold Python literals.
_LITERAL_KEYS = ("stride", "batch", "imgsz", "names", "args", "channels", "end2end", "kpt_shape")
_LAYER = re.compile(r"/model\.(\d+)/")


# -- ONNX facts ------------------------------------------------------------------------------
def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """Ultralytics' metadata of an exported ONNX (names, imgsz, stride, batch, args, ...), parsed."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta: dict[str, Any] = {}
    for prop in model.metadata_props:
        value: Any = prop.value
        if prop.key in _LITERAL_KEYS:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        meta[prop.key] = value
    return meta


def qdq_nodes(model: Any) -> int:
    """Number of QuantizeLinear + DequantizeLinear nodes (a QAT export has them, a float one has none)."""
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def decode_layer(names: Iterable[str]) -> int | None:
    """Index of the model's last layer (the Detect head) from node names like '/model.22/...'."""
    found = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(found) if found else None


def keep_float(name: str, head: int | None) -> bool:
    """Whether a node belongs to the Detect decode that INT8 must not touch.

    The head's output tensor concatenates boxes in pixels with class scores in 0..1; one INT8
    scale for both rounds every score to zero (measured mAP50-95 0.000). Quantised: every layer
    before the head and the head's own cv2/cv3 convolution branches. Float: the rest of the head
    (DFL, anchor decode, sigmoid, concat) and anything after it (an embedded NMS).
    """
    m = _LAYER.search(name)
    if m is None:
        return True
    layer = int(m.group(1))
    if head is None or layer < head:
        return False
    return re.search(rf"/model\.{layer}/cv[23]\.", name) is None


# -- images ----------------------------------------------------------------------------------
def folder_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in ULTRALYTICS_SUFFIXES and p.is_file())


def split_images(data_yaml: str | Path, split: str) -> list[Path]:
    """Image files of a split of an Ultralytics data.yaml (folders or .txt lists)."""
    import yaml

    data_yaml = Path(data_yaml)
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
    root = Path(data.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = data_yaml.parent / root
    entries = data.get(split)
    if not entries:
        raise UserError(f"{data_yaml} has no '{split}' split")
    images: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        p = Path(entry) if Path(entry).is_absolute() else root / entry
        if p.is_dir():
            images += folder_images(p)
        elif p.suffix == ".txt" and p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    q = Path(line.strip())
                    images.append(q if q.is_absolute() else root / q)
    return images


def pick(paths: list[Path], n: int, seed: int = 0) -> list[Path]:
    """A seeded sample of n paths (all of them when there are fewer), in a stable order."""
    if len(paths) <= n:
        return list(paths)
    idx = np.random.default_rng(seed).choice(len(paths), size=n, replace=False)
    return [paths[i] for i in sorted(idx)]


def network_input(path: Path, imgsz: tuple[int, int]) -> np.ndarray | None:
    """One image as the network sees it: float32 CHW RGB in 0..1, letterboxed to imgsz; None if unreadable.

    The predictor's reader and letterbox (EXIF applied, Ultralytics' LetterBox arithmetic), so what
    calibration and parity checks feed is what inference feeds.
    """
    try:
        img, _ = read_image(path)
    except Exception:  # any decoder error means "not a usable image"; callers count what is left
        return None
    boxed, _ = letterbox(img, imgsz)
    return np.ascontiguousarray(boxed.transpose(2, 0, 1), dtype=np.float32) / 255.0


def load_batch(paths: Iterable[Path], imgsz: tuple[int, int]) -> np.ndarray:
    """Readable images among `paths`, stacked as an NCHW float32 batch."""
    arrays = [a for a in (network_input(p, imgsz) for p in paths) if a is not None]
    if not arrays:
        raise UserError(f"none of the images could be read ({', '.join(str(p) for p in list(paths)[:3])} ...)")
    return np.stack(arrays)


@dataclass
class CalibrationSet:
    """Real images for INT8 calibration, loaded lazily, one by one or in batches.

    A file that cannot be read is skipped and kept in `dropped`, so that the record counts the
    images calibration really used (`used`, known once the images have been read).
    """

    paths: list[Path]
    imgsz: tuple[int, int]
    batch: int
    source: str  # what the images are, for the record: "train split of <data.yaml>" or the folder
    dropped: list[Path] = field(default_factory=list)

    def images(self) -> Iterator[np.ndarray]:
        """Each readable image as the network sees it (CHW); raises a UserError when none is readable."""
        any_read = False
        for p in self.paths:
            img = network_input(p, self.imgsz)
            if img is None:
                if p not in self.dropped:  # calibrators may read the set more than once
                    self.dropped.append(p)
                continue
            any_read = True
            yield img
        if not any_read:
            raise UserError(f"none of the {len(self.paths)} calibration images from {self.source} could be read "
                            f"({', '.join(p.name for p in self.paths[:3])} ...); set engine.calib_dir to a folder of "
                            "readable images")

    def batches(self) -> Iterator[np.ndarray]:
        chunk: list[np.ndarray] = []
        for img in self.images():
            chunk.append(img)
            if len(chunk) == self.batch:
                yield np.stack(chunk)
                chunk = []
        if chunk:
            yield np.stack(chunk)

    @property
    def used(self) -> int:
        return len(self.paths) - len(self.dropped)

    def __len__(self) -> int:
        return len(self.paths)


def fill_batch(x: Any, size: int | None) -> Any:
    """`x` (numpy or torch, batch first) with its rows cycled or cut to `size` rows (unchanged for None).

    A fixed-batch graph is fed real images in every row: repeated rows, not zeros, so a parity check
    or a latency run computes on what the model will see.
    """
    if not size or size == len(x):
        return x
    return x[[i % len(x) for i in range(size)]]


def fixed_batches(x: Any, size: int | None) -> Iterator[tuple[Any, int]]:
    """(chunk, real rows) pairs that feed `x` to a graph whose batch is fixed at `size` (None: x whole).

    The last chunk is filled up by `fill_batch`; only its first `real rows` outputs belong to `x`.
    """
    if not size:
        yield x, len(x)
        return
    for i in range(0, len(x), size):
        chunk = x[i : i + size]
        yield fill_batch(chunk, size), len(chunk)


# -- timing and machine facts ----------------------------------------------------------------
def median_ms(fn: Callable[[], Any], runs: int, warmup: int | None = None) -> float:
    """Median wall time of fn() in milliseconds over `runs` calls, after warm-up calls."""
    for _ in range(max(2, runs // 10) if warmup is None else warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 3)


def cpu_model() -> str:
    """The CPU's marketing name (e.g. 'AMD EPYC 9R14'), for latency records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_vnni() -> bool | None:
    """Whether the CPU has VNNI/AMX INT8 dot products (None when unknown).

    Without them (AVX2 or AVX-512 alone) x86 INT8 kernels add u8 x s8 products pairwise in 16 bits,
    which saturates for large values: measured on an AVX2-only CPU, OpenVINO ran a QAT model's
    QDQ graph (symmetric INT8 activations, shifted to u8 + 128) 11% off its true output.
    """
    flags = cpu_flags()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) if flags else None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty when unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
