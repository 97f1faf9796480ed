"""`ddpm continue` and `ddpm delete` against a real API process (no worker: a cancelled job is
a finished one, and the continued job stays queued)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.client import DdpmClient
from tests.client.conftest import RunningApi
from tests.client.test_cli import assert_clean_error, ddpm


@pytest.mark.e2e
def test_continue_then_delete_a_finished_job(api: RunningApi, new_key: Callable[[], str]) -> None:
    key = new_key()
    job_id = ddpm(api, key, "submit", "-", stdin='{"training": {"steps": 5}}').stdout.strip()
    assert_clean_error(ddpm(api, key, "delete", job_id, "--yes"), "error (409)", "cancel it first")
    assert ddpm(api, key, "cancel", job_id).exit_code == 0

    continued = ddpm(api, key, "continue", job_id, "--steps", "12")
    assert continued.exit_code == 0, continued.output
    assert f"job {job_id} queued to 12 steps" in continued.stdout
    with DdpmClient(api.base, key) as client:
        assert (client.get(job_id)["status"], client.get(job_id)["spec"]["training"]["steps"]) == ("queued", 12)
        client.cancel(job_id)
    refused = ddpm(api, key, "continue", job_id, "--steps", "2000000000")
    assert_clean_error(refused, "error (422)", "steps: at most", "DDPM_MAX_STEPS")

    declined = ddpm(api, key, "delete", job_id, stdin="n\n")
    assert declined.exit_code == 1 and "delete job" in declined.stdout
    assert ddpm(api, key, "status", job_id).exit_code == 0  # still there
    deleted = ddpm(api, key, "delete", job_id, stdin="y\n")
    assert deleted.exit_code == 0 and f"job {job_id} deleted" in deleted.stdout
    assert_clean_error(ddpm(api, key, "status", job_id), "error (404)", f"job {job_id} not found")
