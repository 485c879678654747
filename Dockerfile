# GPU image: NGC PyTorch base (ships CUDA, cuDNN, TensorRT and its Python bindings).
#   docker build -t yolo-pipeline .
#   docker run --gpus all --rm -v "$PWD/results:/results" yolo-pipeline stage=all
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    YOLO_OFFLINE=1 \
    YOLO_AUTOINSTALL=false \
    ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS=1 \
    YOLO_CONFIG_DIR=/tmp/yolo-config
# (No OpenVINO telemetry variable: none is read; pipeline.yolo_env blocks it, docs/deploy.md.)

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY conf ./conf

# Keep the base image's CUDA builds of torch/torchvision/TensorRT: pin them as constraints so
# pip never swaps them for PyPI wheels; then install the package (editable: conf/ is read in place).
RUN pip freeze | grep -iE '^(torch|torchvision|tensorrt)[= ]' > /tmp/constraints.txt || true; \
    pip install -c /tmp/constraints.txt -e ".[gpu]" && \
    python -c "import tensorrt, torch, ultralytics; print('TensorRT', tensorrt.__version__, 'torch', torch.__version__)"

RUN useradd --create-home --uid 1000 pipeline && mkdir -p /results && chown pipeline /results /app
USER pipeline

VOLUME ["/results"]
ENTRYPOINT ["python", "-m", "pipeline", "results_dir=/results"]
CMD ["stage=all"]
