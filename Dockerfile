# GPU image: NGC PyTorch 25.12 (Ubuntu 24.04, Python 3.12, CUDA 13.1, torch 2.10.0a0, TensorRT and its
# Python bindings). Its torch satisfies every pin below (nvidia-modelopt needs torch >= 2.8: an
# NGC "2.8.0a0" would not, under PEP 440, and pip would backtrack ModelOpt to an old release).
#   docker build -t yolo-pipeline .
#   docker run --gpus all --ipc=host --rm -v "$PWD/results:/results" yolo-pipeline stage=all
# --ipc=host (or --shm-size=8g): data loader workers at 640 px outgrow Docker's 64 MB /dev/shm.
FROM nvcr.io/nvidia/pytorch:25.12-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=false \
    ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS=1
# No YOLO_CONFIG_DIR: pipeline.yolo_env gives each user their own (/tmp/yolo-tao-pipeline-<uid>), so
# the folder the build-time import creates as root is not the one the run-time user must write.

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY conf ./conf

# NGC pins every package it ships in /etc/pip/constraint.txt (through PIP_CONSTRAINT). Keep only its
# torch / torchvision / tensorrt pins, so pip can never swap those CUDA builds for PyPI wheels while
# our other dependencies resolve freely; `pip check` and the version assertion fail the build if
# anything still moved. The gpu extra brings onnxruntime-gpu alone (no CPU onnxruntime beside it:
# both write the same `onnxruntime` package).
RUN set -eu; \
    torch_before="$(python -c 'import torch; print(torch.__version__)')"; \
    pip list --format=freeze | grep -iE '^(torch|torchvision|tensorrt)==' > /tmp/constraints.txt; \
    grep -qi '^torch==' /tmp/constraints.txt; \
    PIP_CONSTRAINT=/tmp/constraints.txt pip install -e ".[gpu]"; \
    pip check; \
    python -c "import sys, torch, tensorrt, ultralytics, onnxruntime; \
assert torch.__version__ == sys.argv[1], (torch.__version__, sys.argv[1]); \
print('torch', torch.__version__, 'TensorRT', tensorrt.__version__, 'ultralytics', ultralytics.__version__)" "$torch_before"; \
    test "$(pip list --format=freeze | grep -ciE '^onnxruntime(-gpu)?==')" = 1

# A non-root user with a home: NGC images on Ubuntu 24.04 already have `ubuntu` with UID 1000.
RUN (getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 pipeline) \
    && mkdir -p /results && chown 1000 /results /app
USER 1000

VOLUME ["/results"]
# NGC's own entrypoint (its banner, driver and shared-memory checks) runs first, then the pipeline.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "python", "-m", "pipeline", "results_dir=/results"]
CMD ["stage=all"]
