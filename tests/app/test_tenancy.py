"""Every route x {no key, malformed key, unknown key, revoked key, another tenant's key}: 401 for
the first four, 404 (never 403) for another tenant's objects, and no byte of the other tenant's
data in any response. The routes are read from the app's OpenAPI document, so a new route is
covered when it is added."""

from __future__ import annotations

import hashlib
import re
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import Settings
from app.datasets.keys import preview_key
from app.datasets.repository import DatasetRepository
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import ApiKey, Checkpoint, MetricPoint, Sample, SampleRequest, utcnow
from tests.conftest import MakeUser, evaluation_row

PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
SECRET_NAME = f"alice-secret-{uuid.uuid4().hex}"
PAYLOAD = b"alice's weights " + uuid.uuid4().bytes
PNG = b"\x89PNG\r\n\x1a\nalice's samples " + uuid.uuid4().hex.encode()
PREVIEW = b"\x89PNG\r\n\x1a\nalice's data set " + uuid.uuid4().hex.encode()
# Routes that stream until the job ends: checked for 401/404, not read to the end as the owner.
STREAMS = {"/v1/jobs/{job_id}/events"}
ZIP = {"Content-Type": "application/zip"}
FID = 98.7654321


class World:
    """Alice's job with metrics, a checkpoint and its evaluation, her ready data set with its preview;
    keys of every kind."""

    def __init__(self, settings: Settings, make_user: MakeUser) -> None:
        self.settings = settings
        self.alice = make_user("alice")
        self.bob = make_user("bob")
        self.admin = make_user("root", admin=True)
        revoked = make_user("alice")  # a second key of alice's, revoked
        self.app = create_app(settings)
        with TestClient(self.app, headers=self.alice.headers) as c:
            r = c.post("/v1/jobs", json={"name": SECRET_NAME}, headers={"Idempotency-Key": "shared-key"})
            assert r.status_code == 201, r.text
            self.job = r.json()
            r = c.post(f"/v1/datasets?name={SECRET_NAME}", content=b"PK\x05\x06" + bytes(18), headers=ZIP)
            assert r.status_code == 201, r.text
            self.dataset_id = r.json()["id"]
            r = c.post("/v1/webhooks", json={"url": f"https://{SECRET_NAME}.example.com/hook"})
            assert r.status_code == 201, r.text
            self.webhook_id = r.json()["id"]
        job_id = self.job["id"]
        (settings.checkpoint_root / job_id).mkdir(parents=True, exist_ok=True)
        (settings.checkpoint_root / job_id / "step-00000010.safetensors").write_bytes(PAYLOAD)
        (settings.checkpoint_root / job_id / "samples-00000010.png").write_bytes(PNG)
        self.sha256 = hashlib.sha256(PAYLOAD).hexdigest()
        with session_scope(make_sessionmaker(make_engine(settings))) as s:
            s.add(MetricPoint(job_id=uuid.UUID(job_id), step=10, loss=0.123456789, lr=1e-4, images_per_s=1.0))
            s.add(
                Checkpoint(
                    job_id=uuid.UUID(job_id),
                    step=10,
                    path=f"{job_id}/step-00000010.safetensors",
                    size_bytes=len(PAYLOAD),
                    sha256=self.sha256,
                    state_path=f"{job_id}/step-00000010.state.safetensors",
                )
            )
            s.add(evaluation_row(job_id, 10, FID, kid=0.5, kid_std=0.1, samples=10, reference_images=20, seconds=1.0))
            s.add(
                Sample(
                    job_id=uuid.UUID(job_id),
                    step=10,
                    path=f"{job_id}/samples-00000010.png",
                    size_bytes=len(PNG),
                    sha256=hashlib.sha256(PNG).hexdigest(),
                )
            )
            request = SampleRequest(
                job_id=uuid.UUID(job_id),
                checkpoint_step=10,
                count=1,
                seed=0,
                sampler="ddim",
                steps=5,
                status="succeeded",
                png_path=f"{job_id}/samples-00000010.png",
                png_sha256=hashlib.sha256(PNG).hexdigest(),
                npz_path=f"{job_id}/step-00000010.safetensors",  # any recorded file will do here
                npz_sha256=self.sha256,
            )
            s.add(request)
            s.flush()
            self.request_id = str(request.id)
            s.execute(update(ApiKey).where(ApiKey.prefix == revoked.prefix).values(revoked_at=utcnow()))
            self.dataset_sha256 = self._ready_dataset(s)
        self.credentials: dict[str, dict[str, str]] = {
            "no key": {},
            "malformed key": {"Authorization": "Bearer ddpm_nope"},
            "unknown key": {"Authorization": f"Bearer ddpm_{'0' * 8}_{'A' * 43}"},
            "revoked key": revoked.headers,
            "other tenant": self.bob.headers,
        }
        self.fingerprints = [
            job_id,
            SECRET_NAME,
            self.sha256,
            hashlib.sha256(PNG).hexdigest(),
            "0.123456789",
            str(FID),
            PAYLOAD.decode(errors="replace"),
            PNG[8:].decode(),
            self.dataset_id,
            self.dataset_sha256,
            PREVIEW[8:].decode(),
        ]

    def _ready_dataset(self, s) -> str:  # type: ignore[no-untyped-def]
        """Alice's data set, as a worker leaves it prepared: ready, with a preview file."""
        key = preview_key(self.dataset_id)
        (self.settings.checkpoint_root / key).write_bytes(PREVIEW)
        sha256 = hashlib.sha256(PREVIEW).hexdigest()
        values = {"image_count": 3, "sha256": "cd" * 32, "preview_sha256": sha256, "preview_bytes": len(PREVIEW)}
        DatasetRepository(s).update(uuid.UUID(self.dataset_id), status="ready", preview_key=key, **values)
        return sha256

    def routes(self) -> list[tuple[str, str]]:
        paths = self.app.openapi()["paths"]
        return [(m.upper(), path) for path, ops in paths.items() if path not in PUBLIC for m in ops]

    def url(
        self, path: str, job_id: str | None = None, dataset_id: str | None = None, webhook_id: str | None = None
    ) -> str:
        path = path.replace("{job_id}", job_id or self.job["id"]).replace("{step}", "10")
        path = path.replace("{dataset_id}", dataset_id or self.dataset_id)
        path = path.replace("{webhook_id}", webhook_id or self.webhook_id)
        return path.replace("{request_id}", self.request_id)


@pytest.fixture
def world(clean_db: Settings, make_user: MakeUser) -> World:
    return World(clean_db, make_user)


def test_the_matrix_covers_every_route(world: World) -> None:
    assert set(world.routes()) == {
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/cancel"),
        ("DELETE", "/v1/jobs/{job_id}"),
        ("POST", "/v1/jobs/{job_id}/continue"),
        ("GET", "/v1/jobs/{job_id}/metrics"),
        ("GET", "/v1/jobs/{job_id}/checkpoints"),
        ("GET", "/v1/jobs/{job_id}/checkpoints/{step}"),  # a step, `latest` or `best`
        ("GET", "/v1/jobs/{job_id}/checkpoints/{step}/export"),
        ("GET", "/v1/jobs/{job_id}/events"),
        ("GET", "/v1/jobs/{job_id}/evaluations"),
        ("GET", "/v1/jobs/{job_id}/logs"),
        ("GET", "/v1/jobs/{job_id}/training-events"),
        ("GET", "/v1/jobs/{job_id}/loss.png"),
        ("GET", "/v1/jobs/{job_id}/samples"),
        ("GET", "/v1/jobs/{job_id}/samples/{step}.png"),
        ("POST", "/v1/jobs/{job_id}/sample"),
        ("GET", "/v1/jobs/{job_id}/sample/{request_id}"),
        ("GET", "/v1/jobs/{job_id}/sample/{request_id}.png"),
        ("GET", "/v1/jobs/{job_id}/sample/{request_id}.npz"),
        ("POST", "/v1/datasets"),
        ("GET", "/v1/datasets"),
        ("GET", "/v1/datasets/{dataset_id}"),
        ("GET", "/v1/datasets/{dataset_id}/preview.png"),
        ("PATCH", "/v1/datasets/{dataset_id}/upload"),
        ("DELETE", "/v1/datasets/{dataset_id}"),
        ("GET", "/v1/usage"),
        ("POST", "/v1/webhooks"),
        ("GET", "/v1/webhooks"),
        ("GET", "/v1/webhooks/{webhook_id}"),
        ("DELETE", "/v1/webhooks/{webhook_id}"),
        ("GET", "/v1/webhooks/{webhook_id}/deliveries"),
    }
    paths = world.app.openapi()["paths"]
    for method, path in world.routes():
        taught = r"\{(?!job_id\}|step\}|request_id\}|dataset_id\}|webhook_id\})"
        assert not re.search(taught, path), f"{method} {path}: teach this test"
        assert paths[path][method.lower()]["security"] == [{"HTTPBearer": []}], (method, path)
    assert {p for p in paths if p in PUBLIC} == {"/healthz", "/readyz"}
    assert all("security" not in op for p in ("/healthz", "/readyz") for op in paths[p].values())


@pytest.mark.parametrize("credential", ["no key", "malformed key", "unknown key", "revoked key"])
def test_every_route_refuses_a_missing_bad_or_revoked_key_with_401(world: World, credential: str) -> None:
    wrong = []
    with TestClient(world.app) as c:
        for method, path in world.routes():
            r = c.request(method, world.url(path), headers=world.credentials[credential], json={})
            if r.status_code != 401 or any(f in r.text for f in world.fingerprints):
                wrong.append((method, path, r.status_code, r.text[:200]))
    assert wrong == []


def test_another_tenant_gets_404_on_every_job_route_and_sees_nothing(world: World) -> None:
    """Exactly the answer for a job that does not exist (the id bob sent is all it repeats)."""
    wrong, unknown = [], str(uuid.uuid4())
    with TestClient(world.app, headers=world.bob.headers) as c:
        for method, path in world.routes():
            if "{job_id}" not in path:
                continue
            r = c.request(method, world.url(path))
            nobody = c.request(method, world.url(path, unknown))
            same = r.text.replace(world.job["id"], unknown) == nobody.text
            if r.status_code != 404 or not same or any(f in r.text for f in world.fingerprints[1:]):
                wrong.append((method, path, r.status_code, r.text[:200]))
        # Lists show only one's own; another's Idempotency-Key finds nothing of alice's.
        assert c.get("/v1/jobs").json() == {"items": [], "next_cursor": None}
        r = c.post("/v1/jobs", json={"name": SECRET_NAME}, headers={"Idempotency-Key": "shared-key"})
        assert r.status_code == 201 and r.json()["id"] != world.job["id"]
        listed = c.get("/v1/jobs").json()["items"]
        assert [j["id"] for j in listed] == [r.json()["id"]]
    assert wrong == []
    with TestClient(world.app, headers=world.alice.headers) as c:
        mine = c.get(f"/v1/jobs/{world.job['id']}").json()
        assert (mine["status"], mine["cancel_requested"]) == ("queued", False), "bob's cancel did nothing"
        assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [world.job["id"]]


def test_another_tenant_gets_404_on_every_dataset_route_and_sees_nothing(world: World) -> None:
    """As for jobs: the answer for a data set that does not exist, and nothing of alice's changes."""
    wrong, unknown = [], str(uuid.uuid4())
    headers = {"Upload-Offset": "22", **ZIP}  # PATCH's required header: its refusal must be the 404
    secrets = [f for f in world.fingerprints if f != world.dataset_id]  # the id bob sent is all it repeats
    with TestClient(world.app, headers=world.bob.headers) as c:
        for method, path in world.routes():
            if "{dataset_id}" not in path:
                continue
            r = c.request(method, world.url(path), headers=headers, content=b"PK")
            nobody = c.request(method, world.url(path, dataset_id=unknown), headers=headers, content=b"PK")
            same = r.text.replace(world.dataset_id, unknown) == nobody.text
            if r.status_code != 404 or not same or any(f in r.text for f in secrets):
                wrong.append((method, path, r.status_code, r.text[:200]))
        assert c.get("/v1/datasets").json() == {"items": [], "next_cursor": None}
        job = {"dataset": {"kind": "dataset", "id": world.dataset_id}}
        r = c.post("/v1/jobs", json=job)  # nor train on it
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "dataset", "id"]
        assert not any(f in r.text for f in secrets)
    assert wrong == []
    with TestClient(world.app, headers=world.alice.headers) as c:
        mine = c.get(world.url("/v1/datasets/{dataset_id}")).json()
        assert (mine["status"], mine["name"]) == ("ready", SECRET_NAME), "bob's requests changed nothing"
        assert c.get(world.url("/v1/datasets/{dataset_id}/preview.png")).content == PREVIEW


def test_another_tenant_gets_404_on_every_webhook_route_and_sees_nothing(world: World) -> None:
    """As for jobs: the answer for an endpoint that does not exist, and alice's endpoint stays."""
    wrong, unknown = [], str(uuid.uuid4())
    with TestClient(world.app, headers=world.bob.headers) as c:
        for method, path in world.routes():
            if "{webhook_id}" not in path:
                continue
            r = c.request(method, world.url(path))
            nobody = c.request(method, world.url(path, webhook_id=unknown))
            same = r.text.replace(world.webhook_id, unknown) == nobody.text
            if r.status_code != 404 or not same or SECRET_NAME in r.text:
                wrong.append((method, path, r.status_code, r.text[:200]))
        assert c.get("/v1/webhooks").json() == {"items": [], "next_cursor": None}
    assert wrong == []
    with TestClient(world.app, headers=world.alice.headers) as c:
        assert c.get(world.url("/v1/webhooks/{webhook_id}")).status_code == 200, "bob's DELETE did nothing"
        assert c.get(world.url("/v1/webhooks/{webhook_id}/deliveries")).json()["items"] == []
    with TestClient(world.app, headers=world.admin.headers) as c:  # an admin sees every user's, as for jobs
        assert [w["id"] for w in c.get("/v1/webhooks").json()["items"]] == [world.webhook_id]


def test_the_owner_and_an_admin_see_the_job(world: World) -> None:
    for who in (world.alice, world.admin):
        with TestClient(world.app, headers=who.headers) as c:
            for method, path in world.routes():
                if method == "GET" and ("{job_id}" in path or "{dataset_id}" in path) and path not in STREAMS:
                    r = c.get(world.url(path))
                    # Let in: not 401/403/404 (exporting these fake weights is a 410).
                    assert r.status_code in {200, 410}, (who.user.name, path, r.text)
            assert world.job["id"] in [j["id"] for j in c.get("/v1/jobs").json()["items"]]
            assert c.get(world.url("/v1/jobs/{job_id}/checkpoints/latest")).content == PAYLOAD
            assert c.get(world.url("/v1/jobs/{job_id}/checkpoints/best")).content == PAYLOAD
            assert [e["fid"] for e in c.get(world.url("/v1/jobs/{job_id}/evaluations")).json()] == [FID]
            assert c.get(world.url("/v1/jobs/{job_id}/samples/{step}.png")).content == PNG
            assert world.dataset_id in [d["id"] for d in c.get("/v1/datasets").json()["items"]]
            assert c.get(world.url("/v1/datasets/{dataset_id}/preview.png")).content == PREVIEW
    with TestClient(world.app, headers=world.admin.headers) as c:
        assert c.post(world.url("/v1/jobs/{job_id}/cancel")).json()["status"] == "cancelled"


def test_public_routes_need_no_key(world: World) -> None:
    with TestClient(world.app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/openapi.json").status_code == 200
