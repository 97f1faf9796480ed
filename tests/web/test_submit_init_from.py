"""The submit form's "Start from job" field (training.init_from.job) in a real browser: written
into the spec at its path, and the API's refusal shown naming the field."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.web.test_dashboard import BrowserErrors, Stack, api_only, browser, new_page

__all__ = ["api_only", "browser"]  # fixtures, used by name
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_start_from_field_sets_init_from_and_shows_the_refusal(api_only: Stack, browser) -> None:
    missing = str(uuid.uuid4())
    errors = BrowserErrors()
    page = new_page(browser, errors)
    page.goto(f"{api_only.base}/#key={api_only.key}")
    page.click("a[data-nav=new]")
    page.wait_for_selector("#submit-form")
    page.fill("#field-training-learning_rate", "1e-4")
    page.fill("#field-training-init_from-job", missing)
    assert json.loads(page.inner_text("#spec-preview"))["training"] == {
        "learning_rate": 1e-4,
        "init_from": {"job": missing},
    }
    page.click("#submit-job")
    page.wait_for_selector("#submit-errors:not([hidden])")
    assert f"training.init_from.job: job {missing} not found" in page.inner_text("#submit-errors")
    assert errors.page_errors == []
