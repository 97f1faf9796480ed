"""GET /metrics: the service in Prometheus's text format.

Two kinds of metric, put together at every scrape (endpoints.py):
- read from the database (repository.py, collector.py): jobs by status, queue waits, running GPUs,
  images/s of running jobs, checkpoint write seconds, webhook delivery failures. Any API replica
  answers the same, and nothing is lost when a process restarts.
- counted by the API processes themselves (process.py): HTTP request durations by route template
  and live event-stream watchers. With PROMETHEUS_MULTIPROC_DIR set (`serve`, compose) every API
  process of a host writes them to files there and a scrape of any one adds them all up
  (prometheus-client's multiprocess mode).
"""
