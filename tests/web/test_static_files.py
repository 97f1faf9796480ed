"""The dashboard's files and the API's documentation pages without a browser: served without a
key, every module import and asset resolves, and nothing is loaded from another origin (no CDN;
the pages must work offline)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.web import STATIC_DIR

# Vendored libraries keep their license banners (`/*! ... */`), which name their home pages.
LICENSE_BANNER = re.compile(r"/\*!.*?\*/", re.S)
EXTERNAL_URL = re.compile(r"https?://[^\s\"')]*", re.I)
IMPORT = re.compile(r"""^\s*import\s[^"']*["']([^"']+)["']""", re.M)
TEXT_SUFFIXES = {".html", ".css", ".js"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    # No key, no database: the page and its files hold no data.
    yield TestClient(create_app(Settings(data_dir=tmp_path)))


def static_files() -> list[Path]:
    return sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())


class TestServedWithoutKey:
    def test_index_at_root(self, client: TestClient) -> None:
        r = client.get("/")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script type="module" src="static/js/main.js"></script>' in r.text
        assert '<script src="static/vendor/chart.umd.min.js" defer></script>' in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp

    def test_vendored_chart_js(self, client: TestClient) -> None:
        r = client.get("/static/vendor/chart.umd.min.js")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/javascript")
        assert r.text.startswith("/*!\n * Chart.js v4.")
        assert (STATIC_DIR / "vendor" / "chart.js-LICENSE.md").read_text().startswith("The MIT License")

    def test_every_referenced_file_and_module_import(self, client: TestClient) -> None:
        index = client.get("/").text
        pending = re.findall(r'(?:src|href)="(static/[^"]+)"', index)
        assert {"static/app.css", "static/js/main.js", "static/vendor/chart.umd.min.js"} <= set(pending)
        seen: set[str] = set()
        while pending:
            path = pending.pop()
            if path in seen:
                continue
            seen.add(path)
            r = client.get("/" + path)
            assert r.status_code == 200, path
            assert r.headers["cache-control"] == "no-cache"
            if path.endswith(".js") and "/vendor/" not in path:
                folder = path.rsplit("/", 1)[0]
                for target in IMPORT.findall(r.text):
                    assert target.startswith("./") or target.startswith("../"), (path, target)
                    pending.append(_join(folder, target))
        modules = {f"static/{p.relative_to(STATIC_DIR)}" for p in static_files() if p.suffix == ".js"}
        assert modules <= seen, f"modules nothing imports: {modules - seen}"

    def test_not_in_the_api_document(self, client: TestClient) -> None:
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not any(p.startswith("/static") for p in paths)

    def test_a_missing_file_is_404(self, client: TestClient) -> None:
        assert client.get("/static/js/nope.js").status_code == 404
        assert client.get("/static/../app/main.py").status_code == 404


class TestDocsPagesOffline:
    """`/docs` and `/redoc`: every URL the page loads is this app's, and the app serves it."""

    @pytest.mark.parametrize(
        ("page", "assets"),
        [
            ("/docs", {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css", "/docs/static/favicon.png"}),
            ("/redoc", {"/docs/static/redoc.standalone.js", "/docs/static/favicon.png"}),
        ],
    )
    def test_every_asset_is_served_here(self, client: TestClient, page: str, assets: set[str]) -> None:
        r = client.get(page)
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "https:" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert EXTERNAL_URL.findall(r.text) == [], "the page names another origin"
        # src/href attributes, and the URLs FastAPI's templates pass to the libraries in script.
        urls = set(re.findall(r'(?:src|href)="([^"]+)"', r.text))
        urls |= set(re.findall(r"""(?:url|spec-url)[:=]\s*['"]([^'"]+)['"]""", r.text))
        assert urls == assets | {"/openapi.json"}, urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), url
            served = client.get(url)
            assert served.status_code == 200, url
            assert served.content, url
            if url.endswith(".js"):
                assert served.headers["content-type"].startswith("text/javascript"), url

    def test_not_in_the_api_document(self, client: TestClient) -> None:
        paths = client.get("/openapi.json").json()["paths"]
        assert not any(p.startswith(("/docs", "/redoc")) for p in paths)


def test_no_file_loads_from_another_origin() -> None:
    offenders = []
    for path in static_files():
        if path.suffix not in TEXT_SUFFIXES:
            continue
        text = LICENSE_BANNER.sub("", path.read_text(encoding="utf-8"))
        offenders += [f"{path.relative_to(STATIC_DIR)}: {m.group(0)!r}" for m in EXTERNAL_URL.finditer(text)]
    assert offenders == []


def _join(folder: str, relative: str) -> str:
    parts = folder.split("/")
    for piece in relative.split("/"):
        if piece == "..":
            parts.pop()
        elif piece != ".":
            parts.append(piece)
    return "/".join(parts)


def test_an_install_without_the_files_still_serves_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.web.STATIC_DIR", tmp_path / "nothing-here")
    client = TestClient(create_app(Settings(data_dir=tmp_path)))
    r = client.get("/")
    assert r.status_code == 503
    assert "dashboard's files are not installed" in r.text
    assert client.get("/healthz").status_code == 200
