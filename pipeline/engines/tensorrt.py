"""TensorRT on NVIDIA GPUs: fp32 / fp16 / int8 engines from the exported ONNX, on TensorRT 10.x and 11.x.

Supported TensorRT majors: 10 and 11 (older ones are refused by `available`). TensorRT cannot be
installed on the CPU machines the project is developed on, so everything around the builder is a
pure function tested on CPUs (`build_plan`, `profile_shapes`, `layer_precisions`) and the builder
itself runs in tests marked `tensorrt`/`gpu` and in bench/gpu_check.py on a GPU host.

- Explicit quantisation only: a QAT model's QDQ ONNX carries its trained scales; a float ONNX at
  engine.precision=int8 is first quantised to a QDQ ONNX by ModelOpt's ONNX PTQ on real images
  (engine.calib_dir or the training split; pipeline/engines/onnx_ptq.py) and then built exactly
  like a QAT model. The Detect decode stays float in both (no Q/DQ there).
- TensorRT 11 builds strongly typed networks only, so FP16 (fp16 engines, and the float layers of
  QDQ models) is written into the graph by ModelOpt AutoCast, decode and IO kept FP32. TensorRT 10
  builds weakly typed with the FP16 (+INT8 for QDQ) builder flags and the decode layers asked for
  FP32. `build_plan` picks the path from the version string; the record says which ("typing",
  "autocast_fp16").
- The optimisation profile covers what the pipeline runs: batch engine.min_batch..max_batch and,
  for a dynamic-size ONNX, the rectangular shapes of Ultralytics' validation (`profile_shapes`);
  the evaluation batch is clamped to the profile (`evaluation_batch`).
- What TensorRT executes is read back with the engine inspector (detailed profiling verbosity):
  per-layer precision counts and reformat layers (`layer_precisions`). A timing cache beside the
  engine is loaded when present and saved after each build.
- The engine file starts with Ultralytics' metadata header (so AutoBackend and the evaluator load
  it) that also records the TensorRT version and GPU it was built for; `check_compatible` refuses
  an engine built elsewhere instead of letting TensorRT fail obscurely.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engines.backend import Backend, BuildSettings, Built
from pipeline.engines.common import CalibrationSet, decode_layer, keep_float, median_ms
from pipeline.errors import UserError
from pipeline.manifest import atomic_write_bytes, atomic_write_text

HINT = ("TensorRT needs an NVIDIA GPU with CUDA and the TensorRT Python package: on a GPU host install the "
        "`gpu` extra (pip install 'yolo-tao-pipeline[gpu]'), or run the project's Docker image "
        "(docker build -t yolo-pipeline . && docker run --gpus all yolo-pipeline stage=engine ...), whose NGC base ships TensorRT. "
        "On CPUs use engine.backend=openvino (fastest on x86) or engine.backend=onnxruntime")
SUPPORTED_MAJORS = (10, 11)
MIN_VERSION = (SUPPORTED_MAJORS[0], 0)
# Ultralytics pads each rectangular validation batch by half a stride before rounding up to the
# stride (ultralytics/data/build.py, pad=0.5 outside training): the long side reaches imgsz + stride.
RECT_PAD = 0.5


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def available() -> tuple[bool, str]:
    """(usable, why): TensorRT imports, is recent enough, and a CUDA GPU is visible."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return False, f"the tensorrt package does not import ({exc})"
    from pipeline.devices import has_cuda

    if _version_tuple(trt.__version__) < MIN_VERSION:
        return False, f"TensorRT {trt.__version__} is older than {'.'.join(map(str, MIN_VERSION))}"
    if not has_cuda():
        return False, "no CUDA GPU is visible"
    return True, f"TensorRT {trt.__version__} imports and a CUDA GPU is present"


def require(subject: str = "engine.backend=tensorrt") -> Any:
    """The tensorrt module, or a UserError that says how to get TensorRT and which CPU backends exist."""
    ok, why = available()
    if not ok:
        raise UserError(f"{subject} cannot run here: {why}. {HINT}")
    import tensorrt as trt

    return trt


def device_facts() -> dict[str, Any]:
    """TensorRT version, GPU name and compute capability: what an engine is tied to."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}.{minor}"}


# -- what to build: pure functions ------------------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built on one TensorRT major."""

    major: int
    typing: str  # "strong" (precisions from the graph) or "weak" (the builder picks within the flags)
    autocast_fp16: bool  # float layers cast to FP16 in the ONNX by ModelOpt AutoCast before parsing
    ptq: bool  # a float ONNX quantised to QDQ by ModelOpt's ONNX PTQ before the build
    flags: tuple[str, ...]  # trt.BuilderFlag names (weak typing only)
    decode_fp32: bool  # weak typing: the Detect decode layers are asked to stay FP32

    def record(self) -> dict[str, Any]:
        return {"typing": self.typing, "autocast_fp16": self.autocast_fp16, "ptq": "modelopt_onnx" if self.ptq else None,
                "builder_flags": list(self.flags), "tensorrt_path": f"{self.major}.x"}


def build_plan(version: str, precision: str, qdq: bool) -> BuildPlan:
    """The 10.x (weak typing + flags) or 11.x (strong typing, FP16 in the graph) path for one build."""
    if precision not in ("fp32", "fp16", "int8"):
        raise UserError(f"engine.precision={precision} is not valid; choose fp32, fp16 or int8")
    parts = _version_tuple(version)
    major = parts[0] if parts else 0
    if major < SUPPORTED_MAJORS[0]:
        raise UserError(f"TensorRT {version} is not supported (TensorRT {' or '.join(map(str, SUPPORTED_MAJORS))} "
                        f"is); install the `gpu` extra or use the project's Docker image")
    quantised = qdq or precision == "int8"
    ptq = precision == "int8" and not qdq
    if major >= 11:  # later majors are taken as strongly typed too: the weak-typing APIs are gone from 11 on
        return BuildPlan(major, "strong", autocast_fp16=quantised or precision == "fp16", ptq=ptq, flags=(),
                         decode_fp32=False)
    flags = ("INT8", "FP16") if quantised else ("FP16",) if precision == "fp16" else ()
    return BuildPlan(major, "weak", autocast_fp16=False, ptq=ptq, flags=flags, decode_fp32=bool(flags))


def profile_shapes(imgsz: tuple[int, int], stride: int, min_batch: int, opt_batch: int, max_batch: int,
                   rect: bool, channels: int = 3) -> dict[str, tuple[int, int, int, int]]:
    """min / opt / max input shapes (N, C, H, W) of the optimisation profile.

    Batch spans engine.min_batch..max_batch. With `rect` (an ONNX with dynamic height and width,
    which the evaluator runs on rectangular batches at max(imgsz)) each side spans one stride up to
    the padded long side of Ultralytics' rectangular validation; otherwise the size is imgsz.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(f"engine.min_batch={min_batch}, engine.opt_batch={opt_batch}, engine.max_batch={max_batch}: "
                        "the TensorRT profile needs 1 <= min_batch <= opt_batch <= max_batch")
    h, w = imgsz
    if not rect:
        return {k: (b, channels, h, w) for k, b in (("min", min_batch), ("opt", opt_batch), ("max", max_batch))}
    top = math.ceil(max(h, w) / stride + RECT_PAD) * stride
    return {"min": (min_batch, channels, stride, stride), "opt": (opt_batch, channels, h, w),
            "max": (max_batch, channels, top, top)}


def evaluation_batch(requested: int, profile: dict[str, Any]) -> int:
    """evaluate.batch, clamped to the profile's max batch (TensorRT refuses a larger one)."""
    return min(int(requested), int(profile["max"][0]))


def _datatype(tensor: dict[str, Any]) -> str:
    # 11.x writes "DataType" ("Float", "Half", "Int8"); 10.x folds it into "Format/Datatype"
    # ("Row major linear FP32", "Channel major FP16 format where channel % 8 == 0", "... Int8 format").
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or "").lower()
    for dtype, marks in (("int8", ("int8",)), ("bf16", ("bf16", "bfloat")), ("fp16", ("fp16", "half")),
                         ("fp8", ("fp8",)), ("fp32", ("fp32", "float"))):
        if any(m in text for m in marks):
            return dtype
    return "other" if text else "unknown"


def layer_precisions(info: str) -> dict[str, Any]:
    """Counts of engine layers by executed precision, from IEngineInspector's JSON (detailed verbosity).

    A layer is int8 when any input or output is INT8 (a convolution reading INT8 runs INT8 even when
    it writes FP16 for the next dequantised layer), else the type of its first output. Reformat layers
    (TensorRT's layout/precision copies) are counted apart; many of them mean the float islands
    cost conversions. Without detailed verbosity the layers are bare names: counted, precision unknown.
    """
    layers = json.loads(info).get("Layers", [])
    counts: dict[str, Any] = {"layers": len(layers), "int8": 0, "fp16": 0, "fp32": 0, "other": 0, "reformat": 0}
    for layer in layers:
        if not isinstance(layer, dict):
            counts["unknown"] = counts.get("unknown", 0) + 1
            continue
        if layer.get("LayerType") == "Reformat":
            counts["reformat"] += 1
            continue
        ins = [_datatype(t) for t in layer.get("Inputs", [])]
        outs = [_datatype(t) for t in layer.get("Outputs", [])]
        kind = "int8" if "int8" in ins + outs else (outs or ins or ["unknown"])[0]
        key = kind if kind in ("int8", "fp16", "fp32", "unknown") else "other"
        counts[key] = counts.get(key, 0) + 1
    return counts


def executed_precision(counts: dict[str, Any]) -> str | None:
    """The lowest precision any layer runs at (None when the inspector gave no per-layer types)."""
    for dtype in ("int8", "fp16", "fp32"):
        if counts.get(dtype):
            return dtype
    return None


# -- building ---------------------------------------------------------------------------------
def _keep_decode_float(trt: Any, network: Any) -> int:
    """Weak typing: ask for FP32 in the Detect decode layers (boxes in pixels and scores in 0..1 share a tensor)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    head = decode_layer(layer.name for layer in layers)
    floats = (trt.float32, trt.float16)
    count = 0
    for layer in layers:
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if keep_float(layer.name, head) and outputs and all(t.dtype in floats for t in outputs):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            count += 1
    return count


def _network_flags(trt: Any, plan: BuildPlan) -> int:
    if plan.typing == "weak":
        return 0  # explicit batch is the only mode from TensorRT 10
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)  # 11.x: strongly typed whether asked or not


def _load_timing_cache(config: Any, path: Path, log: Any) -> Any:
    """The builder's timing cache, seeded from `path` when a previous build left one (tactic timings reused)."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT did not accept the timing cache %s (another TensorRT or GPU); timing afresh", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    elif data:
        log.info("TensorRT timing cache: %s (%d bytes) reused", path, len(data))
    return cache


def build(src: Path, out: Path, precision: str, qdq: bool, calib: CalibrationSet | None, e: Any,
          imgsz: tuple[int, int], meta: dict[str, Any], log: Any, sample: np.ndarray | None = None,
          timing_cache: Path | None = None) -> dict[str, Any]:
    """Build `out` (.engine with Ultralytics' metadata header) and its sidecar `<out>.json`.

    `calib`: real images for PTQ (float ONNX at int8); `sample`: a real image batch for AutoCast's
    range check (11.x below FP32); `timing_cache`: default `<out>.timing.cache`. Returns the record:
    build path, profile, layer precision counts, and the files written.
    """
    from pipeline.engines import onnx_ptq

    trt = require()
    plan = build_plan(trt.__version__, precision, qdq)
    info: dict[str, Any] = plan.record()
    graph = src
    qdq_onnx = None
    if plan.ptq:
        if calib is None or not len(calib):
            raise UserError("engine.precision=int8 on a float ONNX needs calibration images (engine.calib_dir or "
                            "the training split)")
        qdq_onnx = out.with_suffix(".qdq.onnx")
        info.update(onnx_ptq.quantize_qdq(src, qdq_onnx, calib, log), calib_images=len(calib), calib_source=calib.source)
        graph = qdq_onnx
    if plan.autocast_fp16:
        if sample is None:
            raise ValueError("FP16 AutoCast needs a real image batch (sample)")
        fp16_onnx = out.with_suffix(".fp16.onnx")
        info.update(onnx_ptq.autocast_fp16(graph, fp16_onnx, sample, log))
        graph = fp16_onnx

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {graph}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(e.workspace_gb) * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector reads per-layer types back
    cache_path = timing_cache or out.with_suffix(".timing.cache")
    _load_timing_cache(config, cache_path, log)
    inp = network.get_input(0)
    dims = tuple(inp.shape)
    shapes = profile_shapes(imgsz, int(meta.get("stride", 32)), int(e.min_batch), int(e.opt_batch), int(e.max_batch),
                            rect=dims[2] == -1 and dims[3] == -1, channels=int(dims[1]))
    # Fixed dims stay what the ONNX says; dynamic ones (-1) take the profile's.
    shapes = {k: tuple(d if d != -1 else v for d, v in zip(dims, s, strict=True)) for k, s in shapes.items()}
    if -1 in dims:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    else:
        shapes = {k: dims for k in shapes}
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.decode_fp32:
        info["decode_fp32_layers"] = _keep_decode_float(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    log.info("TensorRT %s: building %s engine, %s typing%s, profile %s", trt.__version__, precision, plan.typing,
             " (FP16 by AutoCast)" if plan.autocast_fp16 else "", shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {graph}; its log above says why")
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    counts = _inspect(trt, logger, serialized, shapes["opt"])

    facts = device_facts()
    header = json.dumps({**meta, "pipeline": {**facts, "precision": precision, "max_batch": shapes["max"][0]}})
    blob = len(header).to_bytes(4, byteorder="little", signed=True) + header.encode() + bytes(serialized)
    atomic_write_bytes(out, blob)
    # int8_layers / compute_layers as the OpenVINO record names them, so the two compare directly
    info.update(profile={k: list(v) for k, v in shapes.items()}, layer_precision=counts,
                executed_precision=executed_precision(counts), int8_layers=counts["int8"],
                compute_layers=counts["layers"] - counts["reformat"])
    sidecar = {**facts, "precision": precision, "qdq": qdq, "workspace_gb": float(e.workspace_gb),
               "built_from": graph.name, **info}
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    return {**facts, **info, "sidecar": out.with_suffix(".json"), "timing_cache": cache_path, "qdq_onnx": qdq_onnx,
            "built_onnx": graph}


def _inspect(trt: Any, logger: Any, serialized: Any, shape: tuple[int, ...]) -> dict[str, Any]:
    """Per-layer precision counts of a freshly built engine, at the profile's opt shape."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    if engine is None:
        raise RuntimeError("TensorRT built an engine it cannot deserialize; its log above says why")
    context = engine.create_execution_context()
    name = next(n for n in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
                if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    if not context.set_input_shape(name, shape):
        raise RuntimeError(f"TensorRT refused the profile's own opt shape {shape} for {name}")
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context  # concrete shapes, so formats and types are shown
    return layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the engine bytes, metadata) of an engine file with Ultralytics' header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(4), byteorder="little")
        if not 0 < n < 1 << 20:  # no header: the file starts with engine bytes
            return 0, {}
        try:
            return 4 + n, json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return 0, {}


def profile_max_batch(path: Path) -> int | None:
    """The max batch of the optimisation profile an engine was built with (None without our build record)."""
    value = (_header(path)[1].get("pipeline") or {}).get("max_batch")
    return int(value) if value else None


def check_compatible(path: Path, strict: bool = True) -> None:
    """Refuse an engine built for another TensorRT version or GPU, saying which and how to fix it.

    `strict=False` (evaluate, infer) lets an engine without our build record (e.g. exported by
    Ultralytics) through to TensorRT, which then decides; TensorRT itself must still be here.
    """
    trt = require(f"{path} (a TensorRT engine)")
    built = _header(path)[1].get("pipeline") or {}
    if not built:
        if not strict:
            return
        raise UserError(f"{path} has no build record (TensorRT version, GPU); rebuild it with stage=engine")
    here = device_facts()
    if built.get("tensorrt_version") != trt.__version__ or built.get("compute_capability") != here["compute_capability"]:
        raise UserError(
            f"{path} was built with TensorRT {built.get('tensorrt_version')} for {built.get('gpu_name')} "
            f"(compute {built.get('compute_capability')}), but this host has TensorRT {trt.__version__} on "
            f"{here['gpu_name']} (compute {here['compute_capability']}); engines are tied to both: rebuild it "
            "here with stage=engine engine.backend=tensorrt engine.input=<the ONNX>"
        )



class Runner:
    """One TensorRT engine on the current CUDA device: `runner(x)` -> the first output, as numpy float32.

    Every enqueue's return value is checked: a refused shape or a failed enqueue raises instead of
    being timed or compared as if it had run.
    """

    def __init__(self, path: Path) -> None:
        import torch

        self.trt = trt = require()
        offset, _ = _header(path)
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes()[offset:])
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot deserialize {path}; its log above says why")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.outputs = [n for n in names if n != self.input]
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, Any] = {}
        dims = tuple(self.engine.get_tensor_shape(self.input))
        self.fixed_batch = None if -1 in dims else int(dims[0])
        self.max_batch = self.fixed_batch or int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])

    def _dtype(self, name: str) -> Any:
        import torch

        return torch.from_numpy(np.empty(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def bind(self, x: np.ndarray) -> bool:
        """Device buffers for input `x`; False when an output's shape depends on the data (an embedded NMS)."""
        import torch

        shape = tuple(int(d) for d in x.shape)
        if not self.context.set_input_shape(self.input, shape):
            raise RuntimeError(f"TensorRT refused input shape {shape}: outside the engine's optimisation profile "
                               f"{tuple(self.engine.get_tensor_profile_shape(self.input, 0))}")
        self.buffers = {self.input: torch.from_numpy(np.ascontiguousarray(x)).to("cuda", self._dtype(self.input))}
        for name in self.outputs:
            dims = tuple(self.context.get_tensor_shape(name))
            if -1 in dims:
                return False
            self.buffers[name] = torch.empty(dims, dtype=self._dtype(name), device="cuda")
        for name, buf in self.buffers.items():
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise RuntimeError(f"TensorRT refused the device address of tensor {name}")
        return True

    def enqueue(self) -> None:
        """One inference on the bound buffers, waited for."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT could not enqueue the inference (execute_async_v3 returned False); "
                               "its log above says why")
        self.stream.synchronize()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output for a batch of any size (run in chunks of the profile's max batch)."""
        parts = []
        for i in range(0, len(x), self.max_batch):
            if not self.bind(x[i : i + self.max_batch]):
                raise RuntimeError("the engine's outputs have data-dependent shapes (an embedded NMS); "
                                   "its raw output cannot be compared")
            self.enqueue()
            parts.append(self.buffers[self.outputs[0]].float().cpu().numpy())
        return np.concatenate(parts)

    def latency_ms(self, x: np.ndarray, runs: int) -> float | None:
        """Median GPU time of one inference on batch `x` (None when an output has a data-dependent shape)."""
        if not self.bind(x):
            return None
        return median_ms(self.enqueue, runs)


class TensorRTBackend(Backend):
    """engine.backend=tensorrt: a .engine for this GPU and TensorRT version (explicit quantisation only)."""

    name = "tensorrt"
    label = "TensorRT"
    device = "cuda"

    def available(self) -> tuple[bool, str]:
        return available()

    def require(self, int8_ptq: bool) -> None:
        require()

    def build(self, src: Path, out_dir: Path, precision: str, qdq: bool, calib: CalibrationSet | None,
              settings: BuildSettings, log: Any) -> Built:
        out = out_dir / "model.engine"
        info = build(src, out, precision, qdq, calib, settings.engine, settings.imgsz, settings.meta, log,
                     sample=settings.sample)
        check_compatible(out)
        outputs: list[tuple[str, Path]] = [("model", out), ("sidecar", info.pop("sidecar")),
                                           ("timing_cache", info.pop("timing_cache"))]
        qdq_onnx = info.pop("qdq_onnx")
        if qdq_onnx is not None:  # the PTQ result: the QDQ ONNX TensorRT was given, kept for other targets
            outputs.append(("qdq_onnx", qdq_onnx))
        info["built_onnx"] = info.pop("built_onnx").name
        return Built(artifact=out, outputs=outputs, record=info)

    def runner(self, built: Built, shape: tuple[int, ...], threads: int) -> Runner:
        return Runner(built.artifact)

    def executed_precision(self, built: Built, runner: Any) -> dict[str, Any]:
        # Read back by the engine inspector at build time (`build`), already in the build record.
        return {k: built.record[k] for k in ("executed_precision", "int8_layers", "compute_layers", "layer_precision")}

    def evaluation_batch(self, built: Built, requested: int) -> int | None:
        return evaluation_batch(requested, built.record["profile"])
