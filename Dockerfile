# The image a TorchX Kubernetes job runs (make launch-k8s IMAGE=...). Not built by the tests (its base comes from a
# registry). Build and push it where you have one:
#   docker build -t registry.example/visionapp:1 . && docker push registry.example/visionapp:1
# For GPUs start from an image with CUDA (e.g. pytorch/pytorch:*-cuda*-runtime) instead. Pin the base by digest
# for builds that repeat (BASE_IMAGE=python:3.11-slim@sha256:...; `docker pull` prints it).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 1000 visionapp
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
COPY configs ./configs
COPY .torchxconfig ./
# The training stage and TorchX, at the versions CI tested (PIN=0: the newest pyproject.toml allows)
ARG PIN=1
RUN pip install --no-cache-dir $([ "$PIN" = 1 ] && echo "-c constraints.txt" || true) -e ".[train,launch]" \
    && python -c "import visionapp.train.cli, torchx" \
    && mkdir -p runs data && chown visionapp runs data
# Runs and generated data are written under /app/runs and /app/data (mount volumes there to keep them).
USER visionapp
# torchrun (from torch) is on PATH here; the component runs `torchrun ... -m visionapp fit`.
