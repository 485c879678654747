"""TensorRT on NVIDIA GPUs: fp32 / fp16 / int8 engines from the exported ONNX.

Written against TensorRT's Python API (8.6 - 10.x; 11 for fp32 and QDQ graphs). TensorRT cannot be
installed on the CPU machines the project is developed on, so this module is small on purpose and
exercised by tests marked `tensorrt`/`gpu` on a GPU host or in the Docker image.

- INT8 by PTQ calibrates with an IInt8EntropyCalibrator2 on real images (engine.calib_dir or the
  training split) and writes the calibration cache beside the engine; the Detect decode layers are
  asked to stay in FP32 (the same rule as the CPU backends).
- A QDQ (QAT) ONNX builds as a strongly typed network (TensorRT >= 9; explicit quantization with
  the INT8 flag on 8.6): precisions and scales come from the graph.
- The engine file starts with Ultralytics' metadata header (so AutoBackend and the evaluator load
  it) that also records the TensorRT version and GPU it was built for; `check_compatible` refuses
  an engine built elsewhere instead of letting TensorRT fail obscurely.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.engines.common import CalibrationSet, decode_layer, keep_float, median_ms
from pipeline.errors import UserError
from pipeline.manifest import atomic_write_bytes, atomic_write_text

HINT = ("TensorRT needs an NVIDIA GPU with CUDA and the TensorRT Python package: on a GPU host install the "
        "`gpu` extra (pip install 'yolo-tao-pipeline[gpu]'), or run the project's Docker image "
        "(docker build -t yolo-pipeline . && docker run --gpus all yolo-pipeline stage=engine ...), whose NGC base ships TensorRT. "
        "On CPUs use engine.backend=openvino (fastest on x86) or engine.backend=onnxruntime")
MIN_VERSION = (8, 6)


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


def _calibrator(trt: Any, calib: CalibrationSet, shape: tuple[int, ...], cache: Path) -> Any:
    """IInt8EntropyCalibrator2 feeding full batches of `shape` from real images, on the GPU."""
    import numpy as np
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = (b for b in CalibrationSet(calib.paths, calib.imgsz, shape[0], calib.source).batches()
                            if len(b) == shape[0])
            self.current = None  # keeps the device buffer alive until TensorRT asks for the next batch

        def get_batch_size(self) -> int:
            return shape[0]

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.current = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
            return [int(self.current.data_ptr())]

        def read_calibration_cache(self) -> None:
            return None  # every build calibrates this model on these images

        def write_calibration_cache(self, data: Any) -> None:
            atomic_write_bytes(cache, bytes(data))

    return EntropyCalibrator()


def _keep_decode_float(trt: Any, network: Any) -> int:
    """Ask for FP32 in the Detect decode layers (boxes in pixels and scores in 0..1 share a tensor)."""
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


def build(src: Path, out: Path, precision: str, qdq: bool, calib: CalibrationSet | None, e: Any,
          imgsz: tuple[int, int], meta: dict[str, Any], log: Any) -> dict[str, Any]:
    """Build `out` (.engine with Ultralytics' metadata header) and its sidecar `<out>.json`."""
    trt = require()
    major = _version_tuple(trt.__version__)[0]
    if major >= 11 and not qdq and precision != "fp32":
        raise UserError(f"engine.precision={precision}: TensorRT {trt.__version__} builds only strongly typed "
                        "networks; use a QAT model (retrain.qat=true, its QDQ ONNX builds as INT8), "
                        "engine.precision=fp32, or TensorRT 10")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = qdq and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")  # TensorRT >= 9
    if strongly_typed:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {src}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(float(e.workspace_gb) * (1 << 30)))
    inp = network.get_input(0)
    dims = tuple(inp.shape)
    # Dynamic dims (-1) take the profile's batch and the exported image size; fixed dims stay.
    shapes = {k: tuple(d if d != -1 else v for d, v in zip(dims, (int(b), dims[1], *imgsz), strict=True))
              for k, b in (("min", e.min_batch), ("opt", e.opt_batch), ("max", e.max_batch))}
    profile = None
    if -1 in dims:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    calib_shape = shapes["opt"]  # TensorRT calibrates at the profile's opt shape

    info: dict[str, Any] = {"strongly_typed": strongly_typed}
    cache = out.with_suffix(".calib.cache")
    if qdq and not strongly_typed:  # TensorRT 8.6: explicit quantization needs the precision flags
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    elif not qdq and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif not qdq and precision == "int8":
        if calib is None or len(calib) < calib_shape[0]:
            raise UserError(f"INT8 calibration needs at least engine.opt_batch={calib_shape[0]} images")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # as TAO: layers INT8 cannot serve may run in FP16
        config.int8_calibrator = _calibrator(trt, calib, calib_shape, cache)
        if profile is not None and major < 10:  # deprecated (and unneeded) from TensorRT 10
            config.set_calibration_profile(profile)
        kept = _keep_decode_float(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        info.update(float_layers=kept, calib_images=len(calib), calib_source=calib.source)
    log.info("TensorRT %s: building %s engine (input %s)", trt.__version__, "QDQ" if qdq else precision,
             shapes if profile is not None else dims)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {src}; its log above says why")

    facts = device_facts()
    header = json.dumps({**meta, "pipeline": {**facts, "precision": "int8" if qdq else precision}})
    blob = len(header).to_bytes(4, byteorder="little", signed=True) + header.encode() + bytes(serialized)
    atomic_write_bytes(out, blob)
    sidecar = {**facts, "precision": precision, "qdq": qdq, "workspace_gb": float(e.workspace_gb),
               "profile": shapes if profile is not None else {"fixed": dims}, **info}
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    calibrated = not qdq and precision == "int8" and cache.exists()
    return {**facts, **info, "cache": cache if calibrated else None, "sidecar": out.with_suffix(".json")}


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


def latency_ms(path: Path, shape: tuple[int, ...], runs: int) -> float | None:
    """Median GPU time of one inference at `shape` (None when an output has a data-dependent shape)."""
    import numpy as np
    import torch

    trt = require()
    offset, _ = _header(path)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes()[offset:])
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if -1 in tuple(engine.get_tensor_shape(inputs[0])):  # a fixed-shape engine runs at its own shape
        context.set_input_shape(inputs[0], shape)
    buffers = []
    for name in names:
        dims = tuple(context.get_tensor_shape(name))
        if -1 in dims:
            return None
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buf = torch.zeros(dims, dtype=dtype, device="cuda")
        context.set_tensor_address(name, buf.data_ptr())
        buffers.append(buf)
    stream = torch.cuda.Stream()

    def once() -> None:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()

    return median_ms(once, runs)
