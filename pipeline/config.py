"""Typed configuration schema, registered in Hydra's ConfigStore.

Every key a user can set lives here with its default and a one-line meaning; the YAML files in
`conf/` only pick groups and presets. Range checks that a type cannot express are in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore

from pipeline.errors import UserError


class Stage(str, Enum):
    kmeans = "kmeans"
    dataset = "dataset"
    train = "train"
    evaluate = "evaluate"
    prune = "prune"
    retrain = "retrain"
    export = "export"
    engine = "engine"
    infer = "infer"
    all = "all"
    report = "report"


@dataclass
class DatasetConfig:
    name: str = "synthetic"  # short name used in results/datasets/<name>-<hash>/
    path: str | None = None  # source folder or file; None = embedded synthetic dataset
    format: str = "auto"  # auto | yolo | darknet | kitti | coco
    val_fraction: float = 0.2  # seeded split when the source has none
    # Embedded synthetic generator (used when path is None).
    synthetic_train: int = 400  # training images
    synthetic_val: int = 100  # validation images
    synthetic_unlabeled: int = 20  # images in the unlabeled/ folder (for infer)
    synthetic_imgsz: int = 320  # square image side in pixels
    synthetic_classes: int = 3  # number of shape classes (max 5)


@dataclass
class ModelConfig:
    name: str = "yolov8n"  # yolov8{n,s,m,l,x} | yolo11{n,s,m,l,x}; built from Ultralytics' YAML
    weights: str | None = None  # local .pt to start from (pretrained weights need the internet or a local file)


@dataclass
class KmeansConfig:
    num_clusters: int = 9  # anchors to find (3 per output scale)
    width: int = 640  # network input width the anchors are expressed in
    height: int = 640  # network input height
    resize: str = "letterbox"  # letterbox (Ultralytics) | stretch (TAO)
    max_steps: int = 10000  # k-medians iteration cap
    min_box_px: float = 2.0  # boxes smaller than this (after scaling) are ignored


@dataclass
class TrainConfig:
    input: str | None = None  # start weights (.pt) instead of model.name/model.weights
    epochs: int = 100
    imgsz: int = 640
    batch: int = 16
    optimizer: str = "auto"  # Ultralytics optimiser name: auto | SGD | Adam | AdamW | ...
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    patience: int = 100  # early stopping (epochs without improvement)
    workers: int = 2  # data loader workers
    threads: int = 0  # CPU compute threads when training on the CPU; 0 = every core (Ultralytics: cores - 1)
    deterministic: bool = True
    device: str = "auto"  # auto | cpu | 0 | 0,1 (several GPUs run Ultralytics DDP)
    freeze: int = 0  # freeze the first N layers (fine-tuning)
    resume: bool = False  # continue the newest interrupted train run
    sparsity: str = "none"  # none | l1 (TAO's L1 on conv weights) | bn (network slimming, BN gammas)
    sparsity_weight: float = 3e-5
    mosaic: float = 1.0
    close_mosaic: int = 10
    cache: bool = False  # cache decoded images in RAM
    plots: bool = True
    nbs: int = 64  # nominal batch: gradients of nbs/batch batches accumulate per optimiser step (Ultralytics)


@dataclass
class EvaluateConfig:
    input: str | None = None  # model artifact to evaluate (default: newest model in results_dir)
    split: str = "val"  # val | train | test
    imgsz: int | None = None  # default: the model's training size
    batch: int = 16
    conf: float = 0.001
    iou: float = 0.7
    ap_mode: str = "coco"  # coco (mAP50, mAP50-95) | voc11 | voc_integrate (TAO's AP@0.5)
    plots: bool = True


@dataclass
class PruneConfig:
    input: str | None = None  # model to prune (default: newest train output)
    mode: str = "threshold"  # threshold (TAO's pth) | target (reach target_params_ratio)
    pth: float = 0.1  # keep filters whose normalised L2 norm > pth
    target_params_ratio: float = 0.5  # kept params / original params, for mode=target
    normalizer: str = "max"  # max | L2
    equalization: str = "union"  # union | intersection | arithmetic_mean | geometric_mean
    granularity: int = 8  # kept channels rounded up to a multiple of this
    min_filters: int = 16  # keep at least min(min_filters, width) channels
    excluded_layers: list[str] = field(default_factory=list)  # module name patterns (fnmatch)
    evaluate: bool = True  # measure mAP right after pruning


@dataclass
class RetrainConfig:
    input: str | None = None  # pruned model (default: newest prune output)
    epochs: int = 50
    imgsz: int = 640
    batch: int = 16
    optimizer: str = "auto"
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    patience: int = 100
    workers: int = 2
    threads: int = 0  # as train.threads
    deterministic: bool = True
    device: str = "auto"
    freeze: int = 0
    sparsity: str = "none"  # TAO's NO_REG: off when retraining
    sparsity_weight: float = 3e-5
    mosaic: float = 1.0
    close_mosaic: int = 10
    cache: bool = False
    plots: bool = True
    nbs: int = 64  # nominal batch (Ultralytics): gradients accumulate over nbs/batch batches per step
    qat: bool = True  # finish with quantisation-aware training (INT8 fake-quant, ModelOpt)
    qat_epochs: int = 10  # epochs of the QAT phase that follows float recovery
    qat_lr0: float = 0.001  # low lr, no warmup for QAT (recipes.md)
    calib_batches: int = 8  # training batches used to calibrate quantiser ranges


@dataclass
class ExportConfig:
    input: str | None = None  # model to export (default: newest retrain, else prune, else train)
    opset: int = 17
    imgsz: int | None = None  # default: the model's training size
    dynamic: bool = True  # dynamic batch axis
    batch: int = 1  # fixed batch when dynamic=false
    half: bool = False  # FP16 weights
    simplify: bool = True  # onnxslim graph simplification
    nms: bool = False  # put NMS inside the graph (standard ONNX NonMaxSuppression)
    nms_conf: float = 0.25  # with nms: confidence threshold baked into the graph
    nms_iou: float = 0.7  # with nms: IoU threshold baked into the graph
    evaluate: bool = True  # mAP of the ONNX model on the validation split
    latency_runs: int = 50  # batch-1 CPU timing runs (after warm-up)
    threads: int = 2  # CPU threads for the latency measurement (ONNX Runtime)


@dataclass
class EngineConfig:
    input: str | None = None  # ONNX model (default: newest export output)
    backend: str = "auto"  # auto | tensorrt | openvino | onnxruntime
    precision: str = "int8"  # fp32 | fp16 | int8
    calib_dir: str | None = None  # calibration images (default: the training split; never random data)
    calib_images: int = 256  # images used for PTQ calibration
    calib_batch: int = 8
    threads: int = 2  # CPU threads for latency measurement
    min_batch: int = 1  # TensorRT optimisation profile
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gb: float = 4.0  # TensorRT builder workspace
    evaluate: bool = True
    latency_runs: int = 50
    # OpenVINO, QAT input: 7-bit weight steps so CPUs without VNNI do not saturate (docs/deploy.md)
    overflow_fix: bool = True


@dataclass
class InferConfig:
    input: str | None = None  # model (default: newest engine, else ONNX, else PyTorch model)
    source: str | None = None  # folder of unlabeled images
    conf: float = 0.3  # TAO's default confidence threshold
    iou: float = 0.7  # NMS IoU
    imgsz: int | None = None  # default: the model's size
    batch: int = 8
    recursive: bool = True
    save_vis: bool = False  # write annotated images
    formats: list[str] = field(default_factory=lambda: ["yolo", "kitti"])
    review_band: list[float] = field(default_factory=lambda: [0.3, 0.5])  # uncertain best-confidence band
    resume: bool = False  # skip images already labelled by the newest failed infer run on this source
    workers: int = 2  # background decode threads
    max_det: int = 300  # most boxes kept per image after NMS
    fast_decode: bool = True  # decode big JPEGs at 1/2-1/8 scale (libjpeg) when still >= the network input
    threads: int = 0  # CPU compute threads for PyTorch models; 0 = every core this process may use


@dataclass
class ReportConfig:
    verify: bool = False  # re-hash every artifact and list mismatches
    plots: bool = True


@dataclass
class Config:
    stage: Stage = Stage.all
    results_dir: str = "results"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | 0 | 0,1
    force: bool = False  # stage=all: redo runs even when a matching one exists
    experiment: Any = None  # name of the preset chosen (set by experiment/*.yaml)
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
    cs.store(group="model", name="schema_model", node=ModelConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset.format": ("auto", "yolo", "darknet", "kitti", "coco"),
    "kmeans.resize": ("letterbox", "stretch"),
    "train.sparsity": ("none", "l1", "bn"),
    "retrain.sparsity": ("none", "l1", "bn"),
    "evaluate.split": ("val", "train", "test"),
    "evaluate.ap_mode": ("coco", "voc11", "voc_integrate"),
    "prune.mode": ("threshold", "target"),
    "prune.normalizer": ("max", "L2"),
    "prune.equalization": ("union", "intersection", "arithmetic_mean", "geometric_mean"),
    "engine.backend": ("auto", "tensorrt", "openvino", "onnxruntime"),
    "engine.precision": ("fp32", "fp16", "int8"),
}

_RANGES: dict[str, tuple[float, float]] = {
    "dataset.val_fraction": (0.0, 0.9),
    "dataset.synthetic_classes": (1, 5),
    "dataset.synthetic_train": (1, 10_000_000),
    "dataset.synthetic_val": (1, 10_000_000),
    "dataset.synthetic_unlabeled": (0, 10_000_000),
    "dataset.synthetic_imgsz": (32, 8192),
    "kmeans.num_clusters": (1, 64),
    "kmeans.width": (8, 8192),
    "kmeans.height": (8, 8192),
    "kmeans.max_steps": (1, 10_000_000),
    "kmeans.min_box_px": (0.0, 8192.0),
    "train.epochs": (0, 100000),
    "train.batch": (1, 4096),
    "train.imgsz": (32, 8192),
    "train.lr0": (0.0, 10.0),
    "train.freeze": (0, 1000),
    "train.sparsity_weight": (0.0, 1.0),
    "train.nbs": (1, 4096),
    "train.threads": (0, 1024),
    "retrain.epochs": (0, 100000),
    "retrain.nbs": (1, 4096),
    "retrain.threads": (0, 1024),
    "retrain.qat_epochs": (0, 100000),
    "retrain.batch": (1, 4096),
    "retrain.imgsz": (32, 8192),
    "retrain.lr0": (0.0, 10.0),
    "retrain.qat_lr0": (0.0, 10.0),
    "retrain.calib_batches": (1, 100000),
    "retrain.freeze": (0, 1000),
    "retrain.sparsity_weight": (0.0, 1.0),
    "prune.pth": (0.0, 1.0),
    "prune.target_params_ratio": (0.0, 1.0),
    "prune.granularity": (1, 4096),
    "prune.min_filters": (1, 4096),
    "evaluate.conf": (0.0, 1.0),
    "evaluate.iou": (0.0, 1.0),
    "infer.conf": (0.0, 1.0),
    "infer.iou": (0.0, 1.0),
    "infer.batch": (1, 4096),
    "infer.workers": (1, 256),
    "infer.threads": (0, 1024),
    "infer.max_det": (1, 100000),
    "engine.threads": (1, 1024),
    "engine.calib_images": (1, 1000000),
    "engine.calib_batch": (1, 4096),
    "engine.min_batch": (1, 4096),
    "engine.workspace_gb": (0.0, 1024.0),
    "engine.latency_runs": (1, 1000000),
    "export.opset": (11, 23),
    "export.batch": (1, 4096),
    "export.nms_conf": (0.0, 1.0),
    "export.nms_iou": (0.0, 1.0),
    "export.latency_runs": (1, 1000000),
    "export.threads": (1, 1024),
}

MODEL_NAMES = tuple(f"{fam}{s}" for fam in ("yolov8", "yolo11") for s in "nsmlx")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: Any) -> None:
    """Refuse values a type cannot rule out, naming the key to fix."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    for key, (lo, hi) in _RANGES.items():
        value = _get(cfg, key)
        if value != value or not lo <= value <= hi:  # NaN fails the first test
            raise UserError(f"{key}={value} is out of range; it must be between {lo} and {hi}")
    if cfg.model.name not in MODEL_NAMES:
        raise UserError(f"model.name={cfg.model.name!r} is not known; choose one of: {', '.join(MODEL_NAMES)}")
    for fmt in cfg.infer.formats:
        if fmt not in ("yolo", "kitti"):
            raise UserError(f"infer.formats contains {fmt!r}; allowed: yolo, kitti")
    band = list(cfg.infer.review_band)
    if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
        raise UserError(f"infer.review_band={band} must be two numbers lo <= hi in [0, 1]")
    if cfg.engine.min_batch > cfg.engine.opt_batch or cfg.engine.opt_batch > cfg.engine.max_batch:
        raise UserError("engine.min_batch <= engine.opt_batch <= engine.max_batch must hold")
