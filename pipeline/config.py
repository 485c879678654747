"""Typed configuration schema, registered in Hydra's ConfigStore.

Every key a user can set lives here with its default and its meaning: the comment on the key's line
(or the comment lines right above it) is the text `python -m pipeline stage=help` prints, so each
key keeps one. The YAML files in `conf/` only pick groups and presets. Choices and ranges that a
type cannot express are the tables below `Config`, checked by `validate`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import io
import sys
import tokenize
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, OmegaConf

from pipeline.errors import UserError
from stages import COMMANDS, STAGES

# The `stage=` choices: every stage of the registry, then the commands (all, report, help).
Stage = Enum("Stage", [(name, name) for name in (*STAGES, *COMMANDS)], type=str, module=__name__)


# Every Ultralytics detection family the installed package builds from its YAML, as a name pattern
# ("{}" = the size): YOLO26 (NMS-free head, no DFL), YOLO12 (attention), YOLO11, YOLOv8, YOLOv5u.
MODEL_FAMILIES = {"yolo26": "yolo26{}", "yolo12": "yolo12{}", "yolo11": "yolo11{}", "yolov8": "yolov8{}",
                  "yolov5u": "yolov5{}u"}
MODEL_SIZES = ("n", "s", "m", "l", "x")
MODEL_NAMES = tuple(pattern.format(size) for pattern in MODEL_FAMILIES.values() for size in MODEL_SIZES)


@dataclass
class DatasetConfig:
    """dataset.*: where the images and labels come from (imported once into results/datasets/)."""

    name: str = "synthetic"  # short name used in results/datasets/<name>-<hash>/
    path: str | None = None  # source folder or file; null = the embedded synthetic dataset
    format: str = "auto"  # auto | yolo | darknet | kitti | coco
    val_fraction: float = 0.2  # seeded split when the source has none
    # Embedded synthetic generator (used when path is null).
    synthetic_train: int = 400  # training images
    synthetic_val: int = 100  # validation images
    synthetic_unlabeled: int = 20  # images in the unlabeled/ folder (for infer)
    synthetic_imgsz: int = 320  # square image side in pixels
    synthetic_classes: int = 3  # number of shape classes (max 5)


@dataclass
class ModelConfig:
    """model.*: the detector (`model=yolo11s` picks a name as well as `model.name=yolo11s`)."""

    name: str = "yolov8n"  # yolo26{n..x} | yolo12{n..x} | yolo11{n..x} | yolov8{n..x} | yolov5{n..x}u; from Ultralytics' YAML
    weights: str | None = None  # local .pt to start from (pretrained weights need the internet or a local file)


@dataclass
class KmeansConfig:
    """kmeans.*: stage=kmeans, anchor shapes and box-size analytics of the training labels."""

    num_clusters: int = 9  # anchors to find (3 per output scale)
    width: int = II("train.imgsz")  # network input width the anchors are expressed in; default train.imgsz
    height: int = II("train.imgsz")  # network input height; default train.imgsz
    resize: str = "letterbox"  # letterbox (Ultralytics) | stretch (TAO)
    max_steps: int = 10000  # k-medians iteration cap
    min_box_px: float = 2.0  # boxes smaller than this (after scaling) are ignored


@dataclass
class FitConfig:
    """The settings train.* and retrain.* share: both hand them to pipeline.training.fit."""

    input: str | None = None  # start weights (.pt) instead of model.name/model.weights
    epochs: int = 100  # training epochs
    imgsz: int = 640  # square training input side in pixels
    batch: int = 16  # images per batch
    optimizer: str = "auto"  # Ultralytics optimiser name: auto | SGD | Adam | AdamW | ...
    lr0: float = 0.01  # initial learning rate
    lrf: float = 0.01  # final learning rate, as a fraction of lr0
    momentum: float = 0.937  # SGD momentum / Adam beta1
    weight_decay: float = 0.0005  # optimiser weight decay
    warmup_epochs: float = 3.0  # epochs of learning-rate warmup (fractions allowed)
    patience: int = 100  # early stopping (epochs without improvement; 0 = never stop early)
    workers: int = 2  # data loader workers (Ultralytics loads in the main process on a CPU)
    threads: int = 0  # CPU compute threads; 0 = auto: the cores other processes leave free (measured)
    deterministic: bool = True  # deterministic algorithms (same seed, same weights on one machine)
    device: str = "auto"  # auto (the top-level device) | cpu | 0 | 0,1 (several GPUs run Ultralytics DDP)
    freeze: int = 0  # freeze the first N layers (fine-tuning)
    sparsity: str = "none"  # none | l1 (TAO's L1 on conv weights) | bn (network slimming, BN gammas)
    sparsity_weight: float = 3e-5  # weight of the sparsity term in the loss
    mosaic: float = 1.0  # probability of mosaic augmentation
    close_mosaic: int = 10  # last N epochs train without mosaic
    cache: bool = False  # cache decoded images in RAM
    plots: bool = True  # Ultralytics' training and validation plots
    nbs: int = 64  # nominal batch: gradients of nbs/batch batches accumulate per optimiser step (Ultralytics)


@dataclass
class TrainConfig(FitConfig):
    """train.*: stage=train, an Ultralytics YOLO detector trained on the pipeline's dataset."""

    resume: bool = False  # continue the newest interrupted train run


@dataclass
class RetrainConfig(FitConfig):
    """retrain.*: stage=retrain, float recovery of the pruned model, then quantisation-aware training."""

    input: str | None = None  # pruned model (default: newest prune output)
    epochs: int = 50  # epochs of float recovery (0 = straight to QAT)
    imgsz: int | None = None  # default: the input model's training size (else train.imgsz)
    # none = TAO's NO_REG: no regulariser while retraining; l1 | bn as for train.sparsity
    sparsity: str = "none"
    qat: bool = True  # finish with quantisation-aware training (INT8 fake-quant, ModelOpt)
    qat_epochs: int = 10  # epochs of the QAT phase that follows float recovery
    qat_lr0: float = 0.001  # learning rate of the QAT phase (SGD, no warmup; docs/retrain-qat.md says why)
    calib_batches: int = 8  # training batches used to calibrate quantiser ranges
    # how the activation ranges are set before QAT: max = ModelOpt's (the largest |x| seen), percentile =
    # the mean over the calibration batches of the 99.99th percentile of |x| (TensorRT's percentile calibration)
    qat_calib: str = "max"
    # weights train on -64..64 codes, the steps OpenVINO's CPU engine runs them at (engine.overflow_fix)
    qat_7bit_weights: bool = False
    # quantise the Detect head's output convs too (as NNCF PTQ does); false = Ultralytics' float ones
    qat_head: bool = True
    # distil from the unpruned parent (the train run in the lineage) in both phases (Ultralytics' distill_model);
    # off by default: it cost 1.7-2.7 mAP50-95 points in every equal-budget run measured (docs/retrain-qat.md)
    distill: bool = False
    distill_weight: float = 6.0  # weight of the distillation loss (Ultralytics' dis)


@dataclass
class EvaluateConfig:
    """evaluate.*: stage=evaluate, and the thresholds of every stage that measures mAP."""

    input: str | None = None  # model artifact to evaluate (default: newest model in results_dir)
    split: str = "val"  # val | train | test
    imgsz: int | None = None  # default: the model's training size
    batch: int = 16  # images per batch
    conf: float = 0.001  # confidence threshold before NMS
    iou: float = 0.7  # NMS IoU threshold
    ap_mode: str = "coco"  # coco (mAP50, mAP50-95) | voc11 | voc_integrate (TAO's AP@0.5)
    plots: bool = True  # confusion matrix and PR curves in the run folder
    threads: int = 0  # CPU compute threads; 0 = auto: the cores other processes leave free (measured)


@dataclass
class PruneConfig:
    """prune.*: stage=prune, structured channel pruning with TAO's threshold semantics."""

    input: str | None = None  # model to prune (default: newest train output)
    mode: str = "threshold"  # threshold (TAO's pth) | target (reach a params/FLOPs ratio) | latency
    pth: float = 0.1  # keep filters whose normalised L2 norm > pth
    target_params_ratio: float = 0.5  # kept params / original params, for mode=target
    target_flops_ratio: float | None = None  # mode=target: kept conv FLOPs / original instead of params
    target_latency_ratio: float = 0.5  # mode=latency: predicted latency budget / unpruned prediction
    latency_backend: str = "auto"  # mode=latency: auto (openvino if installed) | openvino | onnxruntime
    latency_precision: str = "auto"  # mode=latency: auto (int8 when engine.precision=int8, else f32) | int8 | f32
    latency_runs: int = 5  # mode=latency: timed runs (median) per table entry; per model at least 10
    latency_imgsz: int | None = None  # mode=latency: input size to time at (default: the model's training size)
    normalizer: str = "max"  # max | L2
    equalization: str = "union"  # union | intersection | arithmetic_mean | geometric_mean
    granularity: int = 8  # kept channels rounded up to a multiple of this
    min_filters: int = 16  # keep at least min(min_filters, width) channels
    excluded_layers: list[str] = field(default_factory=list)  # module name patterns (fnmatch)
    # depth pruning: remove this many residual bottlenecks of C2f/C3k2 blocks, smallest branch first (docs/prune.md)
    drop_blocks: int = 0
    evaluate: bool = True  # measure mAP right after pruning


@dataclass
class ExportConfig:
    """export.*: stage=export, the model as ONNX (checked against PyTorch, timed on the CPU)."""

    input: str | None = None  # model to export (default: newest retrain, else prune, else train)
    opset: int = 17  # ONNX opset
    imgsz: int | None = None  # default: the model's training size
    dynamic: bool = True  # dynamic batch axis
    batch: int = 1  # fixed batch when dynamic=false
    half: bool = False  # FP16 weights
    qdq_rules: bool = True  # QAT exports: QDQ placement rules so the INT8 graph fuses (docs/deploy.md)
    merge_convs: bool = True  # pruned C2f: its two 1x1 convs (cv1a, cv1b) back into one conv + Split (exact)
    # QAT exports: measure the activation ranges again at export.imgsz on engine.calib_* images; auto = only
    # when export.imgsz differs from the size the model was trained at (docs/deploy.md); always | never
    recalibrate: str = "auto"
    simplify: bool = True  # onnxslim graph simplification
    nms: bool = False  # put NMS inside the graph (standard ONNX NonMaxSuppression)
    nms_conf: float = 0.25  # with nms: confidence threshold baked into the graph
    nms_iou: float = 0.7  # with nms: IoU threshold baked into the graph
    evaluate: bool = True  # mAP of the ONNX model on the validation split
    latency_runs: int = 50  # batch-1 CPU timing runs (after warm-up)
    threads: int = 0  # CPU compute threads; 0 = auto: the cores other processes leave free (measured)


@dataclass
class EngineConfig:
    """engine.*: stage=engine, a TensorRT / OpenVINO / ONNX Runtime engine built from the ONNX model."""

    input: str | None = None  # ONNX model (default: newest export output)
    backend: str = "auto"  # auto | tensorrt | openvino | onnxruntime
    precision: str = "int8"  # fp32 | fp16 | int8
    float_precision: str = "f32"  # OpenVINO float parts: f32 | bf16 | f16 | auto (= the CPU's own pick, bf16 on BF16 CPUs)
    calib_dir: str | None = None  # calibration images (default: the training split; never random data)
    calib_images: int = 256  # images used for PTQ calibration
    calib_batch: int = 8  # images per calibration batch
    threads: int = 0  # CPU compute threads; 0 = auto: the cores other processes leave free (measured)
    min_batch: int = 1  # TensorRT optimisation profile: smallest batch
    opt_batch: int = 1  # TensorRT optimisation profile: the batch it is tuned for
    max_batch: int = 8  # TensorRT optimisation profile: largest batch
    workspace_gb: float = 4.0  # TensorRT builder workspace
    evaluate: bool = True  # mAP of the engine itself on the validation split
    latency_runs: int = 50  # batch-1 timing runs (after warm-up)
    # OpenVINO, QAT input: 7-bit weight steps so CPUs without VNNI do not saturate (docs/deploy.md)
    overflow_fix: bool = True
    overflow_fix_layers: str = "all"  # all | first: only the first conv's weights (NNCF PTQ's default, FIRST_LAYER)


@dataclass
class InferConfig:
    """infer.*: stage=infer, pseudo-labels for a folder of unlabeled images."""

    input: str | None = None  # model (default: newest engine, else ONNX, else PyTorch model)
    source: str | None = None  # folder of unlabeled images
    conf: float = 0.3  # TAO's default confidence threshold
    iou: float = 0.7  # NMS IoU
    imgsz: int | None = None  # default: the model's size
    batch: int = 8  # images per forward pass
    recursive: bool = True  # look for images in sub-folders too
    save_vis: bool = False  # write annotated images
    formats: list[str] = field(default_factory=lambda: ["yolo", "kitti"])  # label files written: yolo, kitti
    review_band: list[float] = field(default_factory=lambda: [0.3, 0.5])  # uncertain best-confidence band
    resume: bool = False  # skip images already labelled by the newest failed infer run on this source
    workers: int = 2  # background decode threads
    max_det: int = 300  # most boxes kept per image after NMS
    fast_decode: bool = True  # decode big JPEGs at 1/2-1/8 scale (libjpeg) when still >= the network input
    threads: int = 0  # CPU compute threads; 0 = auto: the cores other processes leave free (measured)


@dataclass
class ReportConfig:
    """report.*: stage=report, the manifest as a table and plots."""

    verify: bool = False  # re-hash every artifact and list mismatches
    plots: bool = True  # draw the mAP-vs-size plots


@dataclass
class Config:
    """Top-level keys."""

    stage: Stage = Stage.all  # the stage to run
    results_dir: str = "results"  # where runs, datasets and manifest.json live
    seed: int = 0  # seeds data splits, the synthetic dataset, initial weights and training
    device: str = "auto"  # auto (the first CUDA GPU, else cpu) | cpu | cuda | 0 | 0,1
    force: bool = False  # stage=all: redo runs even when a matching one exists
    verbose: bool = False  # console shows Ultralytics' banner, info lines and tables, and dependency warnings
    # stage=all: also run the equal-budget control (the unpruned model through the same retrain,
    # export and engine) and the unpruned FP32 ONNX export the report quotes speedups against
    control: bool = True
    experiment: Any = None  # the preset (conf/experiment/): default | smoke | full
    # Model files from elsewhere allowed to unpickle in full, which runs any code they hold (docs/model-files.md)
    trust_pickle: list[str] = field(default_factory=list)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    kmeans: KmeansConfig = field(default_factory=KmeansConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="dataset", name="schema_dataset", node=DatasetConfig)
    # `model=yolo11s` keeps working as a group choice: one option per known name, no file each.
    for name in MODEL_NAMES:
        cs.store(group="model", name=name, node=ModelConfig(name=name))


SPARSITY_KINDS = ("none", "l1", "bn")
_SIDE = (32, 8192)  # square network input side in pixels
_BATCH = (1, 4096)
_THREADS = (0, 1024)

# Per schema class; a subclass inherits its bases' rules (FitConfig's hold for train and retrain).
_CHOICES: dict[type, dict[str, tuple[str, ...]]] = {
    DatasetConfig: {"format": ("auto", "yolo", "darknet", "kitti", "coco")},
    KmeansConfig: {"resize": ("letterbox", "stretch")},
    FitConfig: {"sparsity": SPARSITY_KINDS},
    EvaluateConfig: {"split": ("val", "train", "test"), "ap_mode": ("coco", "voc11", "voc_integrate")},
    PruneConfig: {"mode": ("threshold", "target", "latency"), "normalizer": ("max", "L2"),
                  "latency_backend": ("auto", "openvino", "onnxruntime"),
                  "latency_precision": ("auto", "int8", "f32"),
                  "equalization": ("union", "intersection", "arithmetic_mean", "geometric_mean")},
    RetrainConfig: {"qat_calib": ("max", "percentile")},
    ExportConfig: {"recalibrate": ("auto", "always", "never")},
    EngineConfig: {"backend": ("auto", "tensorrt", "openvino", "onnxruntime"), "precision": ("fp32", "fp16", "int8"),
                   "overflow_fix_layers": ("all", "first"),
                   "float_precision": ("f32", "bf16", "f16", "auto")},
}

# Inclusive bounds; an optional key (None = a default found at run time) is checked when it is set.
_RANGES: dict[type, dict[str, tuple[float, float]]] = {
    Config: {"seed": (0, 2**32 - 1)},
    DatasetConfig: {"val_fraction": (0.0, 0.9), "synthetic_classes": (1, 5), "synthetic_train": (1, 10_000_000),
                    "synthetic_val": (1, 10_000_000), "synthetic_unlabeled": (0, 10_000_000),
                    "synthetic_imgsz": _SIDE},
    KmeansConfig: {"num_clusters": (1, 64), "width": (8, 8192), "height": (8, 8192), "max_steps": (1, 10_000_000),
                   "min_box_px": (0.0, 8192.0)},
    FitConfig: {"imgsz": _SIDE, "batch": _BATCH, "lr0": (0.0, 10.0), "lrf": (0.0, 10.0), "momentum": (0.0, 1.0),
                "weight_decay": (0.0, 1.0), "warmup_epochs": (0.0, 100000.0), "patience": (0, 100000),
                "workers": (0, 256), "threads": _THREADS, "freeze": (0, 1000), "sparsity_weight": (0.0, 1.0),
                "mosaic": (0.0, 1.0), "close_mosaic": (0, 100000), "nbs": (1, 4096)},
    # Ultralytics cannot train zero epochs; retrain.epochs=0 means "straight to QAT".
    TrainConfig: {"epochs": (1, 100000)},
    RetrainConfig: {"epochs": (0, 100000), "qat_epochs": (0, 100000), "qat_lr0": (0.0, 10.0), "distill_weight": (0.0, 1000.0),
                    "calib_batches": (1, 100000)},
    EvaluateConfig: {"imgsz": _SIDE, "batch": _BATCH, "conf": (0.0, 1.0), "iou": (0.0, 1.0), "threads": _THREADS},
    PruneConfig: {"pth": (0.0, 1.0), "target_params_ratio": (0.0, 1.0), "granularity": (1, 4096),
                  "min_filters": (1, 4096), "target_flops_ratio": (0.0, 1.0), "target_latency_ratio": (0.0, 1.0),
                  "latency_runs": (1, 100000), "drop_blocks": (0, 4096),
                  "latency_imgsz": _SIDE},
    ExportConfig: {"opset": (11, 23), "imgsz": _SIDE, "batch": _BATCH, "nms_conf": (0.0, 1.0),
                   "nms_iou": (0.0, 1.0), "latency_runs": (1, 1000000), "threads": _THREADS},
    EngineConfig: {"calib_images": (1, 1000000), "calib_batch": _BATCH, "threads": _THREADS, "min_batch": _BATCH,
                   "opt_batch": _BATCH, "max_batch": _BATCH, "workspace_gb": (0.0, 1024.0),
                   "latency_runs": (1, 1000000)},
    InferConfig: {"conf": (0.0, 1.0), "iou": (0.0, 1.0), "imgsz": _SIDE, "batch": _BATCH, "workers": (1, 256),
                  "threads": _THREADS, "max_det": (1, 100000)},
}


def _rule(table: dict[type, dict[str, Any]], cls: type, key: str) -> Any:
    """The rule for `key` of `cls`: its own, else the nearest base class's; None when there is none."""
    for klass in cls.__mro__:
        if key in table.get(klass, {}):
            return table[klass][key]
    return None


@functools.cache
def _sections() -> dict[str, type]:
    """Section name -> schema class ("" for the top-level keys)."""
    hints = typing.get_type_hints(Config)
    return {"": Config} | {f.name: hints[f.name] for f in fields(Config) if is_dataclass(hints[f.name])}


@functools.cache
def _leaf_keys() -> dict[str, tuple[type, str]]:
    """Every settable dotted key -> (schema class, field name), in schema order."""
    keys = {}
    for section, cls in _sections().items():
        for f in fields(cls):
            if section == "" and f.name in _sections():
                continue
            keys[f"{section}.{f.name}" if section else f.name] = (cls, f.name)
    return keys


def validate(cfg: Any) -> None:
    """Refuse unknown keys and values a type cannot rule out, naming the key to fix."""
    _refuse_unknown_keys(cfg)
    for key, (cls, name) in _leaf_keys().items():
        value = OmegaConf.select(cfg, key)
        choices = _rule(_CHOICES, cls, name)
        if choices is not None and value not in choices:
            raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
        bounds = _rule(_RANGES, cls, name)
        if bounds is not None and value is not None and not bounds[0] <= value <= bounds[1]:  # NaN fails too
            raise UserError(f"{key}={value} is out of range; it must be between {bounds[0]} and {bounds[1]}")
    if cfg.model.name not in MODEL_NAMES:
        families = ", ".join(p.format("{" + ",".join(MODEL_SIZES) + "}") for p in MODEL_FAMILIES.values())
        raise UserError(f"model.name={cfg.model.name!r} is not known; the families are {families} "
                        "(e.g. model.name=yolo26n)")
    for fmt in cfg.infer.formats:
        if fmt not in ("yolo", "kitti"):
            raise UserError(f"infer.formats contains {fmt!r}; allowed: yolo, kitti")
    band = list(cfg.infer.review_band)
    if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
        raise UserError(f"infer.review_band={band} must be two numbers lo <= hi in [0, 1]")
    if cfg.engine.min_batch > cfg.engine.opt_batch or cfg.engine.opt_batch > cfg.engine.max_batch:
        raise UserError("engine.min_batch <= engine.opt_batch <= engine.max_batch must hold")


def _refuse_unknown_keys(cfg: Any) -> None:
    """A key added with `+` (e.g. +train.epoch=5) passes Hydra's schema check: refuse it here instead."""
    known = _leaf_keys()
    for section, cls in _sections().items():
        node = cfg if section == "" else cfg[section]
        allowed = {f.name for f in fields(cls)}
        for name in node:
            if name not in allowed:
                key = f"{section}.{name}" if section else str(name)
                near = difflib.get_close_matches(key, list(known), n=1)
                hint = f"did you mean {near[0]}? " if near else ""
                raise UserError(f"{key} is not a configuration key; {hint}(python -m pipeline stage=help lists them all)")


@functools.cache
def _meanings() -> dict[str, dict[str, str]]:
    """Schema class name -> field -> its meaning, read from this module's comments.

    A field's meaning is the comment on its last line, else the comment lines right above it.
    """
    source = inspect.getsource(sys.modules[__name__])
    trailing, own_line = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (own_line if tok.line.lstrip().startswith("#") else trailing)[tok.start[0]] = text
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        out[node.name] = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                text = trailing.get(stmt.end_lineno or stmt.lineno)
                if text is None:
                    line, above = stmt.lineno - 1, []
                    while line in own_line:
                        above.insert(0, own_line[line])
                        line -= 1
                    text = " ".join(above)
                out[node.name][stmt.target.id] = text
    return out


def meaning(cls: type, name: str) -> str:
    """The one-line meaning of field `name` of schema class `cls` (inherited ones from their base)."""
    own = (_meanings().get(klass.__name__, {}) for klass in cls.__mro__)
    text = next((found[name] for found in own if name in found), "")
    kind = typing.get_type_hints(cls)[name]
    if isinstance(kind, type) and issubclass(kind, Enum):  # the choices follow the enum, not a comment
        text += ": " + " | ".join(str(v.value) for v in kind)
    return text


def _shown(value: Any) -> str:
    """A value the way it is written on the command line."""
    if isinstance(value, Enum):
        return str(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if OmegaConf.is_list(value) or isinstance(value, list):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return str(value)


def help_text(cfg: Any = None) -> str:
    """Every key with its value and meaning, by section.

    Values come from `cfg` (the composed config of this command line, presets included) or, without
    one, from the schema's defaults.
    """
    source = cfg if cfg is not None else OmegaConf.structured(Config)
    keys = _leaf_keys()
    width = max(len(k) for k in keys)
    values = {k: _shown(OmegaConf.select(source, k, throw_on_missing=False)) for k in keys}
    vwidth = min(24, max(len(v) for v in values.values()))
    lines = ["Keys (set any on the command line: python -m pipeline key=value); value shown, then meaning."]
    for cls in _sections().values():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += ["", doc]
        for key, (klass, name) in keys.items():
            if klass is cls:
                lines.append(f"  {key:<{width}}  {values[key]:<{vwidth}}  {meaning(cls, name)}")
    return "\n".join(lines) + "\n"


def print_help(cfg: Any = None) -> None:
    """`stage=help`: print `help_text(cfg)`."""
    print(help_text(cfg), end="")

