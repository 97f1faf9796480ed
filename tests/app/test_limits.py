"""What one request or one user may ask of the service: for each limit, the largest accepted
value and the smallest refused one (422 naming the field, 429, 413)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.spec import JobSpec
from app.spec_size import activation_bytes_per_image, training_memory_bytes, unet_parameter_count
from tests.conftest import ApiUser

CIFAR = {"model": {"preset": "ddpm-cifar10"}, "dataset": {"image_size": 32, "channels": 3}}
ONE_LEVEL = {"preset": "custom", "channels": [32], "layers_per_block": 1, "norm_groups": 8}


def client_for(settings: Settings, user: ApiUser) -> TestClient:
    return TestClient(create_app(settings), headers=user.headers)


@pytest.fixture
def limited(clean_db: Settings, alice: ApiUser):
    """`limited(**settings)`: a client under other limits."""
    opened: list[TestClient] = []

    def make(**update) -> TestClient:
        c = client_for(clean_db.model_copy(update=update), alice)
        opened.append(c.__enter__())
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def refused(r, loc: list) -> str:
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == loc, error
    return error["msg"]


@pytest.mark.parametrize(
    ("field", "largest", "loc", "env"),
    [
        ({"training": {"steps": 1_000_000}}, 1_000_000, ["body", "training", "steps"], "DDPM_MAX_STEPS"),
        ({"training": {"batch_size": 1024}}, 1024, ["body", "training", "batch_size"], "DDPM_MAX_BATCH_SIZE"),
        (
            {"dataset": {"image_size": 512}, "model": ONE_LEVEL, "training": {"batch_size": 1}},
            512,
            ["body", "dataset", "image_size"],
            "DDPM_MAX_IMAGE_SIZE",
        ),
        (
            {"model": ONE_LEVEL | {"channels": [1024], "norm_groups": 1}, "dataset": {"image_size": 8}},
            1024,
            ["body", "model", "channels", 0],
            "DDPM_MAX_CHANNELS",
        ),
        ({"diffusion": {"timesteps": 10_000}}, 10_000, ["body", "diffusion", "timesteps"], "DDPM_MAX_TIMESTEPS"),
    ],
)
def test_largest_accepted_and_smallest_refused(client: TestClient, field: dict, largest: int, loc: list, env: str):
    r = client.post("/v1/jobs", json=field)
    assert r.status_code == 201, r.text
    bigger = json.loads(json.dumps(field).replace(str(largest), str(largest + 1)))
    msg = refused(client.post("/v1/jobs", json=bigger), loc)
    assert env in msg and str(largest) in msg


def test_defaults(clean_db: Settings) -> None:
    s = Settings()
    assert (s.max_queued_jobs_per_user, s.max_steps, s.max_batch_size, s.max_image_size) == (10, 1_000_000, 1024, 512)
    assert (s.max_channels, s.max_timesteps, s.max_parameters, s.gpu_memory_gb) == (1024, 10_000, 200_000_000, 80.0)
    assert s.max_request_bytes == 1 << 20
    assert s.data_roots == [(s.data_dir / "datasets").resolve()]


class TestParameters:
    def test_the_limit_is_on_the_computed_parameter_count(self, limited) -> None:
        params = unet_parameter_count(JobSpec.model_validate(CIFAR))
        assert params == 35_746_307
        assert limited(max_parameters=params).post("/v1/jobs", json=CIFAR).status_code == 201
        r = limited(max_parameters=params - 1).post("/v1/jobs", json=CIFAR)
        msg = refused(r, ["body", "model", "channels"])
        assert "35,746,307 parameters" in msg and "DDPM_MAX_PARAMETERS" in msg

    def test_a_huge_model_is_refused_by_default(self, client: TestClient) -> None:
        huge = {"preset": "custom", "channels": [1024] * 4, "layers_per_block": 8, "norm_groups": 32}
        r = client.post("/v1/jobs", json={"model": huge, "dataset": {"image_size": 32}, "training": {"batch_size": 1}})
        refused(r, ["body", "model", "channels"])


class TestMemory:
    def test_the_largest_batch_that_fits_the_gpu_and_the_next(self, limited) -> None:
        spec = {"training": {"batch_size": 100}}
        need = training_memory_bytes(JobSpec.model_validate(spec))
        gpu_gb = need / 2**30
        assert limited(gpu_memory_gb=gpu_gb).post("/v1/jobs", json=spec).status_code == 201
        over = {"training": {"batch_size": 101}}
        msg = refused(limited(gpu_memory_gb=gpu_gb).post("/v1/jobs", json=over), ["body", "training", "batch_size"])
        assert "at most 100 images per batch fit" in msg and "DDPM_GPU_MEMORY_GB" in msg
        assert "set training.micro_batch to at most 100" in msg
        # The batch of 101 in micro-batches of 100 fits; of 101 (the whole share) it does not.
        split = {"training": {"batch_size": 101, "micro_batch": 100}}
        assert limited(gpu_memory_gb=gpu_gb).post("/v1/jobs", json=split).status_code == 201
        whole = {"training": {"batch_size": 101, "micro_batch": 101}}
        msg = refused(limited(gpu_memory_gb=gpu_gb).post("/v1/jobs", json=whole), ["body", "training", "micro_batch"])
        assert "at most 100 images per micro-batch fit" in msg

    def test_the_estimate_grows_with_the_batch_and_with_attention(self) -> None:
        small = JobSpec.model_validate({"training": {"batch_size": 1}})
        big = JobSpec.model_validate({"training": {"batch_size": 2}})
        per_image = training_memory_bytes(big) - training_memory_bytes(small)
        assert per_image == activation_bytes_per_image(small) > 0
        attn = JobSpec.model_validate({"model": {"attention_resolutions": [small.dataset.image_size]}})
        assert activation_bytes_per_image(attn) > activation_bytes_per_image(small)

    def test_ddpm_cifar10_at_its_paper_batch_fits_the_default_gpu(self, client: TestClient) -> None:
        spec = CIFAR | {"training": {"batch_size": 128}}
        assert client.post("/v1/jobs", json=spec).status_code == 201
        r = client.post("/v1/jobs", json={"dataset": {"image_size": 512}, "training": {"batch_size": 1024}})
        refused(r, ["body", "training", "batch_size"])


class TestQuota:
    def test_the_eleventh_active_job_is_429_until_one_finishes(self, client: TestClient, make_user) -> None:
        ids = [client.post("/v1/jobs", json={}).json()["id"] for _ in range(10)]
        r = client.post("/v1/jobs", json={})
        assert r.status_code == 429
        reason = r.json()["detail"]
        assert "10 queued or running jobs" in reason and "DDPM_MAX_QUEUED_JOBS_PER_USER" in reason
        assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200
        assert client.post("/v1/jobs", json={}).status_code == 201
        bob = make_user("bob")  # another user's quota is their own
        assert client.post("/v1/jobs", json={}, headers=bob.headers).status_code == 201

    def test_a_repeat_with_the_same_idempotency_key_is_not_counted(self, limited) -> None:
        c = limited(max_queued_jobs_per_user=1)
        first = c.post("/v1/jobs", json={}, headers={"Idempotency-Key": "k"})
        again = c.post("/v1/jobs", json={}, headers={"Idempotency-Key": "k"})
        assert (first.status_code, again.status_code) == (201, 200)
        assert c.post("/v1/jobs", json={}).status_code == 429


class TestRequestSize:
    def body_of(self, size: int) -> bytes:
        body = b'{"name": "x"}'
        return body[:-1] + b" " * (size - len(body)) + b"}"  # whitespace is valid JSON

    def test_a_body_at_the_limit_is_parsed_one_byte_more_is_413(self, limited) -> None:
        c = limited(max_request_bytes=4096)
        headers = {"content-type": "application/json"}
        assert c.post("/v1/jobs", content=self.body_of(4096), headers=headers).status_code == 201
        r = c.post("/v1/jobs", content=self.body_of(4097), headers=headers)
        assert r.status_code == 413
        assert c.get("/v1/jobs").json()["items"].__len__() == 1

    def test_a_streamed_body_without_content_length_is_counted(self, limited) -> None:
        c = limited(max_request_bytes=4096)

        def chunks(total: int) -> Iterator[bytes]:
            body = self.body_of(total)
            for i in range(0, total, 1000):
                yield body[i : i + 1000]

        headers = {"content-type": "application/json"}
        r = c.post("/v1/jobs", content=chunks(5000), headers=headers)
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
        assert c.post("/v1/jobs", content=chunks(4000), headers=headers).status_code == 201

    def test_the_default_limit_is_one_mebibyte(self, client: TestClient) -> None:
        r = client.post("/v1/jobs", content=self.body_of((1 << 20) + 1), headers={"content-type": "application/json"})
        assert r.status_code == 413


class TestDataRoots:
    @pytest.fixture
    def roots(self, tmp_path: Path, limited) -> tuple[Path, Path, TestClient]:
        root, outside = tmp_path / "datasets", tmp_path / "elsewhere"
        (root / "mnist" / "train").mkdir(parents=True)
        (root / "mnist" / "train" / "0.png").write_bytes(b"an image")  # the API looks for one, never reads it
        outside.mkdir()
        os.symlink(outside, root / "escape")
        os.symlink(root / "mnist", root / "alias")
        return root, outside, limited(data_roots=[root])

    @staticmethod
    def folder(path: str) -> dict:
        return {"dataset": {"kind": "folder", "path": path}}

    @pytest.mark.parametrize("path", ["mnist", "alias", "mnist/train", "ROOT/mnist"])
    def test_paths_under_a_root_are_accepted(self, roots, path: str) -> None:
        root, _, c = roots
        r = c.post("/v1/jobs", json=self.folder(path.replace("ROOT", str(root))))
        assert r.status_code == 201, r.text

    @pytest.mark.parametrize("path", ["../elsewhere", "mnist/../../elsewhere", "OUTSIDE", "/etc", "escape", "escape/x"])
    def test_paths_leaving_the_roots_are_refused_before_queueing(self, roots, path: str) -> None:
        _, outside, c = roots
        r = c.post("/v1/jobs", json=self.folder(path.replace("OUTSIDE", str(outside))))
        refused(r, ["body", "dataset", "path"])
        assert c.get("/v1/jobs").json()["items"] == []

    @pytest.mark.parametrize(
        ("path", "says"),
        [
            ("no-such-folder", "does not exist"),
            ("mnist/train/0.png", "is not a directory"),
            ("empty", "holds no .jpeg/.jpg/.png image"),
            ("dangling", "does not exist"),
        ],
    )
    def test_a_folder_the_api_sees_missing_or_empty_is_422_at_submit(self, roots, path: str, says: str) -> None:
        root, _, c = roots
        (root / "empty" / "sub").mkdir(parents=True)
        (root / "empty" / "notes.txt").write_text("no image here")
        os.symlink(root / "gone", root / "dangling")
        r = c.post("/v1/jobs", json=self.folder(path))
        refused(r, ["body", "dataset", "path"])
        assert says in r.json()["detail"][0]["msg"] and path in r.json()["detail"][0]["msg"]
        assert c.get("/v1/jobs").json()["items"] == []

    def test_a_root_the_api_cannot_see_is_left_to_the_worker_unless_always(self, tmp_path: Path, limited) -> None:
        unseen = tmp_path / "on-the-workers-only"
        body = self.folder("mnist")
        assert limited(data_roots=[unseen]).post("/v1/jobs", json=body).status_code == 201
        always = limited(data_roots=[unseen], dataset_folder_check="always").post("/v1/jobs", json=body)
        refused(always, ["body", "dataset", "path"])
        assert "does not exist" in always.json()["detail"][0]["msg"]
        # Outside the roots is refused whatever the setting.
        never = limited(data_roots=[unseen], dataset_folder_check="never")
        refused(never.post("/v1/jobs", json=self.folder("/etc")), ["body", "dataset", "path"])

    def test_a_nul_in_text_fields_is_422_not_500(self, client: TestClient) -> None:
        refused(client.post("/v1/jobs", json={"name": "a\u0000b"}), ["body", "name"])


# The analytic count against the real diffusers model (torch is fine in tests, never in app/).
PARAMETER_GRID = [
    {},  # tiny
    CIFAR,
    {"model": {"preset": "custom", "channels": [16], "layers_per_block": 1}, "dataset": {"image_size": 8}},
    {
        "model": {"preset": "custom", "channels": [8], "layers_per_block": 3, "attention_resolutions": [8]},
        "dataset": {"image_size": 8, "channels": 3},
    },
    {"model": {"preset": "custom", "channels": [16, 32], "layers_per_block": 2, "attention_resolutions": [8]}},
    {
        "model": {"preset": "custom", "channels": [16, 16, 32], "attention_resolutions": [16, 4]},
        "dataset": {"image_size": 16, "channels": 3},
    },
    {
        "model": {"preset": "custom", "channels": [8, 16, 24, 32], "layers_per_block": 3, "norm_groups": 8},
        "dataset": {"image_size": 32},
    },
    {
        "model": {"preset": "custom", "channels": [32, 16, 48, 8], "layers_per_block": 2, "attention_resolutions": [4]},
        "dataset": {"image_size": 32},
    },
]


@pytest.mark.parametrize("body", PARAMETER_GRID, ids=lambda b: json.dumps(b.get("model", "tiny")))
def test_the_parameter_count_matches_diffusers(body: dict) -> None:
    pytest.importorskip("torch")
    from worker.ddpm.model import build_unet

    spec = JobSpec.model_validate(body)
    assert unet_parameter_count(spec) == sum(p.numel() for p in build_unet(spec).parameters())
