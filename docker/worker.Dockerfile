# The GPU worker: torch TORCH_VERSION (the version the tests run) from the PyTorch wheel index
# TORCH_INDEX_URL (a CUDA build; the wheels carry the CUDA libraries, the host needs only the
# NVIDIA driver and container toolkit), plus this project with its `worker` extra. The base has a
# C/C++ compiler: torch.compile builds Triton's launchers and Inductor's CPU kernels with it
# (pytorch#116696), and python:*-slim ships Python's headers. Build from the repository root:
#   docker build -f docker/worker.Dockerfile .
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# The same uid as the API image, so the shared volumes have one owner.
RUN useradd --create-home --uid 10001 --user-group ddpm \
    && mkdir -p /data/checkpoints /data/datasets \
    && chown -R ddpm:ddpm /data

# torch first, from its own index, so the project's `torch>=...` keeps this build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY app/ app/
COPY migrations/ migrations/
COPY worker/ worker/
RUN pip install --no-cache-dir ".[worker]" \
    && rm -rf /src/build /src/*.egg-info

USER ddpm
WORKDIR /home/ddpm
# One process per GPU, solo pool (app.cli.WORKER_COMMAND). SIGTERM = save a checkpoint, then exit.
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO"]
