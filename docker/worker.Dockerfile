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
# FID's Inception-v3 (NVIDIA's TorchScript port of TF-FID's inception-2015-12-05, as StyleGAN2-ADA,
# EDM and clean-fid use). Fetched only when its sha256 is given, and checked against it:
#   docker build -f docker/worker.Dockerfile --build-arg FID_WEIGHTS_SHA256=<the file's sha256, lowercase hex> .
# Without it the image has no weights and jobs on users' images train without FID ("evaluation
# unavailable"); the digits set needs none. Weights mounted at run time: set DDPM_FID_WEIGHTS and
# DDPM_FID_WEIGHTS_SHA256 in the environment instead.
ARG FID_WEIGHTS_URL=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
ARG FID_WEIGHTS_SHA256=

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

# python:*-slim has no curl: Python fetches it. An empty DDPM_FID_WEIGHTS would read as the path
# ".", so the path is always set; without the file and its sha256 the worker says evaluation is unavailable.
RUN if [ -n "${FID_WEIGHTS_SHA256}" ]; then \
        mkdir -p /opt/ddpm \
        && python -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
            "${FID_WEIGHTS_URL}" /opt/ddpm/inception-2015-12-05.pt \
        && echo "${FID_WEIGHTS_SHA256}  /opt/ddpm/inception-2015-12-05.pt" | sha256sum -c - ; \
    fi
ENV DDPM_FID_WEIGHTS=/opt/ddpm/inception-2015-12-05.pt \
    DDPM_FID_WEIGHTS_SHA256=${FID_WEIGHTS_SHA256}

USER ddpm
WORKDIR /home/ddpm
# One process per GPU, solo pool (app.cli.WORKER_COMMAND). SIGTERM = save a checkpoint, then exit.
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO"]
