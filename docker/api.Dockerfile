# The API image (also runs the one-shot `migrate`): the base dependencies only, no torch.
# Build from the repository root: docker build -f docker/api.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same uid as the worker image, so the shared volumes have one owner.
RUN useradd --create-home --uid 10001 --user-group ddpm \
    && mkdir -p /data/checkpoints /data/datasets \
    && chown -R ddpm:ddpm /data

WORKDIR /src
# Only what the API needs: worker/ is left out, so its package is simply not installed.
COPY pyproject.toml README.md alembic.ini ./
COPY app/ app/
COPY migrations/ migrations/
# No `[worker]` extra: torch and the ML stack stay out of this image.
RUN pip install --no-cache-dir . \
    && rm -rf /src/build /src/*.egg-info

USER ddpm
WORKDIR /home/ddpm
EXPOSE 8000
CMD ["ddpm-jobs", "api"]
