# The image a TorchX Kubernetes job runs (make launch-k8s IMAGE=...). Not built by the tests: this
# machine has no Docker engine. Build and push it where you have one:
#   docker build -t registry.example/visionapp:1 . && docker push registry.example/visionapp:1
# For GPUs start from an image with CUDA (e.g. pytorch/pytorch:*-cuda*-runtime) instead.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY configs ./configs
COPY .torchxconfig ./
RUN pip install --no-cache-dir -e . \
    && python -c "import visionapp.train.cli, torchx"
# torchrun (from torch) is on PATH here; the component runs `torchrun ... -m visionapp fit`.
