"""A job's log lines, per attempt, as the worker kept them (worker/job_log.py)."""
