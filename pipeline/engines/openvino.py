"""OpenVINO on CPUs: an IR folder Ultralytics can load, INT8 from QAT scales or NNCF PTQ, precision read back.

- A QDQ (QAT) ONNX is read as is: OpenVINO executes its QuantizeLinear/DequantizeLinear pairs as
  INT8 kernels with the trained scales, so there is no recalibration. With `overflow_fix` (the
  default) its weight quantisers first get a twice-as-wide step, i.e. 7-bit weights, as NNCF's
  own overflow fix does: CPUs without VNNI multiply u8 x s8 pairs into int16 with saturation
  (255 x 127 x 2 > 32767), which on the default run cost 11 points of mAP50-95; with 7-bit
  weights (255 x 63 x 2 < 32767) the IR is right on every x86 CPU, at a measured cost of 0.0003.
- A float ONNX becomes fp32, fp16 (weights stored in FP16) or int8 (NNCF post-training
  quantisation on real images, Detect decode kept in float, as for ONNX Runtime).
- The float parts (an fp32 IR; the Detect decode and any float island of an INT8 IR) run at the
  precision recorded with the IR (`float_precision` in metadata.yaml, default f32), set as
  `INFERENCE_PRECISION_HINT` wherever the IR is compiled: here, and inside Ultralytics' AutoBackend
  (`honour_recorded_precision`). Left to the runtime, a CPU with BF16 (Sapphire Rapids, Zen 4) runs
  them in bf16 and one without runs f32, so the same IR gave boxes up to 35 px apart (docs/deploy.md).
- `openvino.convert_model` stores the weights of quantised layers as INT8 in the .bin (a QDQ
  ONNX read with `Core.read_model` would keep them FP32: 13.4 vs 3.1 MB for yolov8n);
  `pipeline.yolo_env` blocks the telemetry that the converter and NNCF would otherwise send.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engines.backend import Backend, BuildSettings, Built
from pipeline.engines.common import (
    CalibrationSet,
    cpu_has_vnni,
    cpu_model,
    decode_layer,
    keep_float,
    median_ms,
)
from pipeline.errors import require
from pipeline.manifest import atomic_write_text

HINT = ("install it with `pip install openvino nncf` (both on PyPI and ordinary dependencies of this "
        "package), or choose engine.backend=onnxruntime")
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
_NOT_OPS = ("Parameter", "Result", "Constant")
# engine.float_precision -> OpenVINO's INFERENCE_PRECISION_HINT; "auto" leaves the runtime's choice.
FLOAT_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16", "auto": None}
QDQ_TOLERANCE = 0.01  # mean relative difference a QDQ model may show between two INT8 runtimes


def require_openvino(int8: bool = False) -> Any:
    """The openvino module (and NNCF for PTQ), or a UserError that says how to install them."""
    if int8:
        require("nncf", f"engine.backend=openvino engine.precision=int8 needs NNCF: {HINT}")
    return require("openvino", f"engine.backend=openvino needs OpenVINO: {HINT}")


def available() -> bool:
    """Whether OpenVINO imports here."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    return str(require_openvino().__version__)


class _Images:
    """NNCF calibration source: one letterboxed real image per item, re-iterable."""

    def __init__(self, calib: CalibrationSet):
        self.calib = calib

    def __iter__(self) -> Iterator[np.ndarray]:
        for img in self.calib.images():
            yield img[None]


def build(src: Path, out_dir: Path, precision: str, qdq: bool, calib: CalibrationSet | None,
          meta: dict[str, Any], log: Any, overflow_fix: Path | None = None,
          float_precision: str = "f32", overflow_fix_layers: str = "all") -> dict[str, Any]:
    """Write `out_dir` (a `*_openvino_model/` folder: model.xml, model.bin, metadata.yaml) from an ONNX.

    `overflow_fix`: for a QDQ input, where to write the 7-bit-weight ONNX that OpenVINO then reads
    (kept for the caller's parity check); None reads `src` as it is; `overflow_fix_layers` "all" widens
    every weight quantiser, "first" only the first convolution's (NNCF's FIRST_LAYER). `float_precision` (a key of
    FLOAT_PRECISIONS) is recorded with the IR and applied wherever it is compiled.
    """
    if float_precision not in FLOAT_PRECISIONS:
        raise ValueError(f"float_precision={float_precision!r}; expected one of {sorted(FLOAT_PRECISIONS)}")
    ov = require_openvino()
    meta = {**meta, "float_precision": float_precision}
    info: dict[str, Any] = {"quantization": "none", "float_precision": float_precision}
    if qdq and overflow_fix is not None:
        import onnx

        graph = onnx.load(str(src))
        info["overflow_fix_layers"] = widen_weight_steps(graph, first_only=overflow_fix_layers == "first")
        log.info("overflow fix: %d weight quantisers set to 7-bit steps", info["overflow_fix_layers"])
        onnx.save(graph, str(overflow_fix))
        src = overflow_fix
    model = ov.convert_model(str(src))
    if qdq:
        info["quantization"] = "qat (trained QDQ scales)"
        info["overflow_fix"] = overflow_fix is not None
    elif precision == "int8":
        if calib is None:
            raise ValueError("int8 needs a calibration set")
        import nncf

        ops = [op for op in model.get_ops() if op.get_type_name() not in _NOT_OPS]
        head = decode_layer(op.get_friendly_name() for op in ops)
        ignored = [op.get_friendly_name() for op in ops if keep_float(op.get_friendly_name(), head)]
        log.info("NNCF INT8: %d images, %d of %d ops kept in float (Detect decode, layer %s)",
                 len(calib), len(ignored), len(ops), head)
        model = nncf.quantize(model, nncf.Dataset(_Images(calib)), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(calib), ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
        info.update(quantization="nncf ptq", float_ops=len(ignored))
    _set_rt_info(model, meta)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=precision == "fp16" and not qdq)
    write_metadata(tmp / "metadata.yaml", meta)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return info


# Without VNNI, u8 x s8 pairs are summed into int16 with saturation: 255 x 64 x 2 = 32640 fits, 255 x 127 x 2 does not.
SAFE_WEIGHT_CODE = 64


def _largest_code(weight: np.ndarray, scale: np.ndarray, node: Any) -> float:
    """The largest |int8 code| a weight QuantizeLinear gives its weights (per-tensor or per-axis scale)."""
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 1 and scale.size > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    return float(np.abs(np.round(weight / np.where(scale == 0, 1.0, scale))).max(initial=0.0))


def widen_weight_steps(graph: Any, first_only: bool = False) -> int:
    """Double the scale of every weight QuantizeLinear/DequantizeLinear pair of a QDQ ONNX, in place.

    Weights then use -64..63 of the int8 range (7 bits). Activation scales, the trained part that
    calibration would otherwise have to find, stay exactly as QAT left them. Weights whose codes already
    fit in -64..64 (a QAT model trained with 7-bit steps) are left as they are. `first_only`: only the
    first weight quantiser in graph order (the first convolution, which reads the image). Returns the count.
    """
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.graph.initializer}
    consts = {n.output[0]: n for n in graph.graph.node if n.op_type == "Constant"}
    consumers: dict[str, list[Any]] = {}
    for n in graph.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def value(name: str) -> np.ndarray:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return numpy_helper.to_array(next(a.t for a in consts[name].attribute if a.name == "value"))

    count = 0
    for q in graph.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] not in inits:
            continue  # activations (and anything not a constant weight) keep their trained scales
        if _largest_code(value(q.input[0]), value(q.input[1]), q) <= SAFE_WEIGHT_CODE:
            continue  # already trained with 7-bit steps (retrain.qat_7bit_weights): nothing to widen
        name = f"{q.input[1]}/overflow_fix_{count}"
        graph.graph.initializer.append(numpy_helper.from_array((value(q.input[1]) * 2).astype(np.float32), name))
        q.input[1] = name
        for dq in consumers.get(q.output[0], []):
            if dq.op_type == "DequantizeLinear":
                dq.input[1] = name
        count += 1
        if first_only:
            break
    onnx.checker.check_model(graph)
    return count


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    """metadata.yaml as Ultralytics' AutoBackend reads it (names, imgsz, stride, batch, args)."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(meta, sort_keys=False, allow_unicode=True))


def _set_rt_info(model: Any, meta: dict[str, Any]) -> None:
    """The model_info block OpenVINO's Model API reads (what Ultralytics' own export writes)."""
    names = meta.get("names") or {}
    model.set_rt_info("YOLO", ["model_info", "model_type"])
    model.set_rt_info(True, ["model_info", "reverse_input_channels"])
    model.set_rt_info(114, ["model_info", "pad_value"])
    model.set_rt_info([255.0], ["model_info", "scale_values"])
    model.set_rt_info([str(v).replace(" ", "_") for v in names.values()], ["model_info", "labels"])
    model.set_rt_info("fit_to_window_letterbox", ["model_info", "resize_type"])
    hint = FLOAT_PRECISIONS.get(str(meta.get("float_precision", "auto")))
    if hint is not None:  # OpenVINO's own place for compile options that travel with a model
        model.set_rt_info(hint, ["runtime_options", "INFERENCE_PRECISION_HINT"])


def recorded_precision(ir: Path) -> str:
    """The float precision recorded with an IR folder or .xml (`auto` for IRs that record none)."""
    import yaml

    folder = ir if ir.is_dir() else ir.parent
    try:
        meta = yaml.safe_load((folder / "metadata.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return "auto"
    value = str(meta.get("float_precision", "auto")) if isinstance(meta, dict) else "auto"
    return value if value in FLOAT_PRECISIONS else "auto"


def compile_config(float_precision: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base` compile options plus the INFERENCE_PRECISION_HINT that `float_precision` stands for."""
    config = dict(base or {})
    hint = FLOAT_PRECISIONS[float_precision]
    if hint is not None:
        config["INFERENCE_PRECISION_HINT"] = hint
    return config


def honour_recorded_precision() -> None:
    """Make Ultralytics' AutoBackend compile our IRs at their recorded float precision (idempotent).

    AutoBackend compiles an IR with the runtime's default precision (bf16 on a BF16 CPU) and
    recompiles it per input shape on AMX CPUs; its OpenVINO backend is swapped for a subclass that
    adds the recorded hint to the compile options it keeps, so every compile it makes honours it.
    """
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.nn.backends.openvino import OpenVINOBackend

    current = AutoBackend._BACKEND_MAP.get("openvino")
    if current is None or getattr(current, "honours_recorded_precision", False):
        return

    class RecordedPrecisionBackend(current):  # type: ignore[misc, valid-type]
        honours_recorded_precision = True

        def load_model(self, weight: str | Path) -> None:
            super().load_model(weight)
            w = Path(weight)
            xml = w if w.is_file() else next(w.glob("*.xml"))
            fp = recorded_precision(xml)
            if FLOAT_PRECISIONS[fp] is None:
                return
            part = self.compile_model  # functools.partial(core.compile_model, device_name=..., config=...)
            config = compile_config(fp, part.keywords.get("config"))
            self.compile_model = functools.partial(part.func, *part.args, **{**part.keywords, "config": config})
            model = self.read_model() if getattr(self, "read_model", None) is not None else None
            if model is None:
                model = part.func.__self__.read_model(model=str(xml), weights=xml.with_suffix(".bin"))
            self.ov_compiled_model = self.compile_model(model)

    assert issubclass(RecordedPrecisionBackend, OpenVINOBackend)
    AutoBackend._BACKEND_MAP["openvino"] = RecordedPrecisionBackend


def compile_static(xml: Path, shape: tuple[int, ...], threads: int, float_precision: str | None = None) -> Any:
    """The IR compiled for the CPU at a fixed input shape, `threads` inference threads, latency mode.

    `float_precision` None: the precision recorded with the IR (`auto`, the runtime's choice, for an
    IR that records none, e.g. one exported by another tool).
    """
    ov = require_openvino()
    core = ov.Core()
    model = core.read_model(str(xml))
    model.reshape(list(shape))
    fp = float_precision or recorded_precision(Path(xml))
    config = compile_config(fp, {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY"})
    return core.compile_model(model, "CPU", config)


def infer(compiled: Any, batch: np.ndarray) -> np.ndarray:
    """First output of a compiled model on `batch`."""
    return next(iter(compiled(batch).values()))


def executed_precision(compiled: Any) -> dict[str, Any]:
    """What the CPU plugin actually runs, read from the compiled model's runtime graph (not assumed).

    Counts compute layers (convolutions, matmuls) by their runtime precision: any I8/U8 layer makes
    the model "int8" (the Detect decode stays float by design); otherwise bf16/fp16/fp32. Besides,
    every op that runs on the input's data by precision (`ops_by_precision`: "int8" for i8/u8, else
    the runtime's name; ops on constants alone, e.g. the reshapes of INT8 weight scales, are left
    out) and the `reorders` among them, the conversions a float island inside an INT8 graph costs.
    """
    counts: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    constant: set[str] = set()
    reorders = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer, runtime = rt["layerType"].astype(str), rt["runtimePrecision"].astype(str)
        if layer in COMPUTE_LAYERS:
            counts[runtime] += 1
        sources = [i.get_source_output().get_node().get_friendly_name() for i in op.inputs()]
        if layer == "Const" or (sources and all(s in constant for s in sources)):
            constant.add(op.get_friendly_name())
        elif layer not in ("Input", "Output"):
            reorders += layer == "Reorder"
            ops["int8" if runtime in ("i8", "u8") else runtime] += 1
    int8 = counts["i8"] + counts["u8"]
    precision = ("int8" if int8 else "bf16" if counts["bf16"] else "fp16" if counts["f16"] else "fp32")
    return {"executed_precision": precision, "int8_layers": int8, "compute_layers": sum(counts.values()),
            "runtime_precisions": dict(counts), "ops_by_precision": dict(ops), "reorders": reorders,
            "inference_precision_hint": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}


class _CompiledRunner:
    """An IR compiled for each input shape it is given (first the latency batch's), as a backend Runner."""

    fixed_batch = None  # the IR is reshaped to whatever batch it is given

    def __init__(self, xml: Path, shape: tuple[int, ...], threads: int) -> None:
        self.xml, self.shape, self.threads = xml, tuple(shape), threads
        self._compiled: dict[tuple[int, ...], Any] = {}
        self.compiled(self.shape)

    def compiled(self, shape: tuple[int, ...]) -> Any:
        shape = tuple(int(d) for d in shape)
        if shape not in self._compiled:
            self._compiled[shape] = compile_static(self.xml, shape, self.threads)
        return self._compiled[shape]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return infer(self.compiled(x.shape), x)

    def latency_ms(self, x: np.ndarray, runs: int) -> float | None:
        compiled = self.compiled(x.shape)
        return median_ms(lambda: infer(compiled, x), runs)


class OpenVINOBackend(Backend):
    """engine.backend=openvino: an IR folder (QAT scales as INT8, NNCF PTQ, fp16 or fp32 weights)."""

    name = "openvino"
    label = "OpenVINO"

    def available(self) -> tuple[bool, str]:
        if available():
            return True, "OpenVINO imports (the fast CPU runtime)"
        return False, "OpenVINO does not import"

    def require(self, int8_ptq: bool) -> None:
        require_openvino(int8=int8_ptq)

    def build(self, src: Path, out_dir: Path, precision: str, qdq: bool, calib: CalibrationSet | None,
              settings: BuildSettings, log: Any) -> Built:
        e = settings.engine
        folder = out_dir / "model_openvino_model"  # the *_openvino_model/ name is how AutoBackend recognises it
        # The parity check compares OpenVINO with ONNX Runtime on the graph OpenVINO read (with the
        # overflow fix: the 7-bit-weight one); the fix's own effect shows in mAP50_95 vs source_mAP50_95.
        fixed = out_dir / "qdq_7bit_weights.onnx" if qdq and e.overflow_fix else None
        record = build(src, folder, precision, qdq, calib, settings.meta, log, overflow_fix=fixed,
                       float_precision=str(e.float_precision), overflow_fix_layers=str(e.overflow_fix_layers))
        outputs = [("model", folder), ("ir_xml", folder / "model.xml"), ("ir_bin", folder / "model.bin")]
        return Built(artifact=folder, outputs=outputs, record=record, reference=fixed)

    def runner(self, built: Built, shape: tuple[int, ...], threads: int) -> _CompiledRunner:
        return _CompiledRunner(built.artifact / "model.xml", shape, threads)

    def executed_precision(self, built: Built, runner: Any) -> dict[str, Any]:
        return executed_precision(runner.compiled(runner.shape))

    def facts(self, threads: int) -> dict[str, Any]:
        return {"cpu_int8_vnni": cpu_has_vnni(), "latency_threads": threads, "cpu_model": cpu_model(),
                "openvino_version": version()}

    def review(self, record: dict[str, Any], qdq: bool, engine: Any) -> list[str]:
        diff = record.get("mean_rel_diff_vs_onnx")
        if not qdq or diff is None or diff <= QDQ_TOLERANCE:
            return []
        why = ("; this CPU has no VNNI and its INT8 kernels saturate: leave engine.overflow_fix=true"
               if record.get("cpu_int8_vnni") is False and not engine.overflow_fix else "")
        return [f"OpenVINO's INT8 output is {diff:.1%} off the QAT model's own (ONNX Runtime, same images){why}: "
                "compare mAP50_95 with source_mAP50_95"]
