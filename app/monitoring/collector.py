"""The database's metrics as Prometheus families, read at each scrape (repository.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from app.monitoring.repository import WINDOW, MonitoringRepository

# From a job that starts at once to one that waited a day.
QUEUE_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
# A small model on local disk to a large one uploaded to S3.
CHECKPOINT_WRITE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_WINDOW_TEXT = f"in the last {WINDOW.total_seconds() / 3600:g} h"


def gauge_histogram(name: str, documentation: str, values: Sequence[float], bounds: Iterable[float]) -> Metric:
    """`values` as cumulative buckets (le), with +Inf and their sum."""
    buckets = [(repr(float(bound)), float(sum(1 for v in values if v <= bound))) for bound in bounds]
    buckets.append(("+Inf", float(len(values))))
    return GaugeHistogramMetricFamily(name, documentation, buckets=buckets, gsum_value=float(sum(values)))


class DatabaseCollector(Collector):
    """Reads the database once per collect(), in the session it is given (the scrape's own)."""

    def __init__(self, session: Session) -> None:
        self.repo = MonitoringRepository(session)

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("ddpm_jobs", "Jobs by status (deleted jobs excluded).", labels=["status"])
        for status, count in sorted(self.repo.jobs_by_status().items()):
            jobs.add_metric([status], count)
        yield jobs

        running = self.repo.running_jobs()
        yield GaugeMetricFamily(
            "ddpm_running_gpus", "GPUs held by running jobs (resources.gpus).", value=sum(j.gpus for j in running)
        )
        rates = GaugeMetricFamily(
            "ddpm_job_images_per_second",
            "Training throughput of each running job, from its latest metric point.",
            labels=["job_id"],
        )
        utilisation = GaugeMetricFamily(
            "ddpm_job_mfu",
            "Model FLOP utilisation (0-1) of each running job on a GPU, from its latest metric point.",
            labels=["job_id"],
        )
        for job in running:
            if job.images_per_s is not None:
                rates.add_metric([str(job.job_id)], job.images_per_s)
            if job.mfu is not None:
                utilisation.add_metric([str(job.job_id)], job.mfu)
        yield rates
        yield utilisation

        yield gauge_histogram(
            "ddpm_queue_wait_seconds",
            f"Seconds attempts started {_WINDOW_TEXT} waited in the queue: from the job's creation (first "
            "attempt) or the end of the previous attempt that sent it back to the queue.",
            self.repo.queue_waits(),
            QUEUE_WAIT_BUCKETS,
        )
        yield gauge_histogram(
            "ddpm_checkpoint_write_seconds",
            f"Seconds checkpoints stored {_WINDOW_TEXT} took from their snapshot to their files being stored "
            "(written to disk, and uploaded with S3), waiting time excluded.",
            self.repo.checkpoint_write_seconds(),
            CHECKPOINT_WRITE_BUCKETS,
        )
        yield CounterMetricFamily(
            "ddpm_webhook_delivery_failures",
            "Tries of webhook deliveries that got no 2xx answer.",
            value=self.repo.webhook_failures(),
        )
