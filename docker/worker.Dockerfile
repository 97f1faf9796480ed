# The GPU worker: the official PyTorch CUDA runtime image (torch 2.10, CUDA 12.8, cuDNN 9),
# plus this project with its `worker` extra. Build from the repository root:
#   docker build -f docker/worker.Dockerfile .
FROM pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same uid as the API image, so the shared checkpoint volume has one owner.
RUN useradd --create-home --uid 10001 --user-group ddpm \
    && mkdir -p /data/checkpoints \
    && chown -R ddpm:ddpm /data

WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY app/ app/
COPY migrations/ migrations/
COPY worker/ worker/
# torch>=2.10 is already in the base image, so pip keeps it and adds the rest of the extra.
RUN pip install --no-cache-dir ".[worker]" \
    && rm -rf /src/build /src/*.egg-info

USER ddpm
WORKDIR /home/ddpm
# One process per GPU, solo pool (app.cli.WORKER_COMMAND). SIGTERM = save a checkpoint, then exit.
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO"]
