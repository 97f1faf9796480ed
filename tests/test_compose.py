"""docker-compose.yml and the two Dockerfiles, checked without Docker: the services, their
commands against the real entrypoints, the settings they pass against `Settings`, secrets, the
GPU reservation, start-up order, the data sets' volume, the workers' healthcheck (run against a
real worker), the worker image's torch, and that the API image installs without torch."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from app.cli import EMBEDDED_WORKER_COMMAND, EMBEDDED_WORKER_ROLES, WORKER_COMMAND, cli
from app.config import Settings
from tests.e2e.conftest import process, worker_argv

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"

# The forms of interpolation this file may use (compose also knows others; we keep to these).
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}$]*))?\}")
SECRET_VARS = {"POSTGRES_PASSWORD", "DDPM_SECRET_KEY"}
# Secrets a deployment may leave out, which turns their feature off: the metrics scrape's token.
OPTIONAL_SECRETS = {"DDPM_METRICS_TOKEN"}
SECRETS = {
    "POSTGRES_PASSWORD": "pw",
    "DDPM_SECRET_KEY": "Jq3vW9xLm2Tz7RkP0cYh5NfB8sDg4AeU",
}
BOOTSTRAP_KEY = "ddpm_0123abcd_" + "k" * 43
WORKERS = ("worker", "worker-samples", "worker-gpu1", "worker-node")
DATASETS_MOUNT = "${DATASETS_DIR:-datasets}:/data/datasets"


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation for the forms above; `$$` is a literal `$`."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group("name", "op", "arg")
        if name in env and (env[name] or op is None):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return INTERPOLATION.sub(one, text.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(raw: str) -> dict[str, Any]:
    return yaml.safe_load(raw)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def copy_sources(path: Path) -> list[str]:
    return [src for kw, args in dockerfile_instructions(path) if kw == "COPY" for src in args.split()[:-1]]


# --- the compose file ------------------------------------------------------------------------


def test_services_and_volumes(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    assert "version" not in compose
    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "api",
        "worker",
        "worker-samples",
        "worker-gpu1",
        "worker-node",
        "prometheus",  # profile monitoring (tests/test_monitoring_stack.py)
        "grafana",
    }
    # Only the default set starts with a plain `docker compose up`; the other workers are opt-in.
    assert {name for name, svc in services.items() if "profiles" not in svc} == {
        "postgres",
        "redis",
        "migrate",
        "api",
        "worker",
        "worker-samples",
    }
    assert set(compose["volumes"]) == {"pgdata", "redisdata", "checkpoints", "datasets", "prometheus", "grafana"}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert command_of(services["redis"])[-2:] == ["--appendonly", "yes"]
    assert "redisdata:/data" in services["redis"]["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_commands_are_the_real_entrypoints(services: dict[str, dict[str, Any]]) -> None:
    assert command_of(services["migrate"]) == ["ddpm-jobs", "migrate"]
    assert command_of(services["api"]) == ["ddpm-jobs", "api"]
    for name in ("worker", "worker-samples", "worker-gpu1", "worker-node"):
        assert command_of(services[name]) == WORKER_COMMAND, name
    # `ddpm-jobs serve` runs the same workers, without Celery's banner, one of each role.
    assert [arg for arg in EMBEDDED_WORKER_COMMAND if arg != "--quiet"] == WORKER_COMMAND
    assert ("all", services["worker-samples"]["environment"]["DDPM_WORKER_ROLE"]) == EMBEDDED_WORKER_ROLES
    assert services["migrate"]["restart"] == "no"  # a string: YAML would read a bare no as False


def test_ddpm_jobs_console_script_has_the_commands() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["ddpm-jobs"] == "app.cli:main"
    assert {"migrate", "api", "serve"} <= set(get_command(cli).commands)  # type: ignore[attr-defined]
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("migrate", "api", "serve"):
        assert re.search(rf"\b{name}\b", result.output), result.output


def test_every_ddpm_setting_is_a_settings_field(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    envs = [compose["x-ddpm-env"]] + [svc.get("environment", {}) for svc in services.values()]
    keys = {key for env in envs for key in env if key.startswith("DDPM_")}
    assert {"DDPM_ENV", "DDPM_DATABASE_URL", "DDPM_BROKER_URL", "DDPM_CHECKPOINT_DIR", "DDPM_DATA_DIR"} <= keys
    unknown = {key for key in keys if key.removeprefix("DDPM_").lower() not in Settings.model_fields}
    assert not unknown, f"not fields of app.config.Settings: {sorted(unknown)}"
    # The shared block reaches every service built from this project (YAML merge key).
    for name in ("migrate", "api", "worker", "worker-samples", "worker-gpu1", "worker-node"):
        assert compose["x-ddpm-env"].items() <= services[name]["environment"].items(), name


def test_settings_accept_the_values(raw: str) -> None:
    compose = yaml.safe_load(interpolate(raw, SECRETS))
    for name in ("migrate", "api", "worker"):
        env = {k.removeprefix("DDPM_").lower(): v for k, v in compose["services"][name]["environment"].items()}
        settings = Settings(**{k: v for k, v in env.items() if k in Settings.model_fields})
        assert settings.env == "production"
        assert settings.database_url == "postgresql+psycopg://ddpm:pw@postgres:5432/ddpm"
        assert settings.broker_url == "redis://redis:6379/0"
        assert settings.checkpoint_root == Path("/data/checkpoints")
        assert settings.secret_key == SECRETS["DDPM_SECRET_KEY"]
    assert "DDPM_BOOTSTRAP_API_KEY" not in compose["services"]["worker"]["environment"]


def test_bootstrap_key_is_optional(raw: str) -> None:
    """Unset, the API makes and prints the first key itself (tests/app/test_auth.py::TestApiFirstKey);
    so `docker compose run --rm --no-deps api ddpm-jobs keys generate` works before it exists."""
    for env, expected in ((SECRETS, None), (SECRETS | {"DDPM_BOOTSTRAP_API_KEY": BOOTSTRAP_KEY}, BOOTSTRAP_KEY)):
        api = yaml.safe_load(interpolate(raw, env))["services"]["api"]["environment"]
        settings = Settings(bootstrap_api_key=api["DDPM_BOOTSTRAP_API_KEY"])
        assert settings.bootstrap_api_key == expected


def test_interpolations_are_well_formed(raw: str) -> None:
    stripped = INTERPOLATION.sub("", raw.replace("$$", ""))
    assert "$" not in stripped, [line for line in stripped.splitlines() if "$" in line]


def test_secrets_are_required_and_never_literal(raw: str, compose: dict[str, Any]) -> None:
    for match in INTERPOLATION.finditer(raw):
        if match["name"] in SECRET_VARS:
            assert match["op"] == ":?", match.group(0)
    for name in SECRET_VARS:
        others = {k: v for k, v in SECRETS.items() if k != name}
        with pytest.raises(KeyError, match=name):
            interpolate(raw, others)
        with pytest.raises(KeyError, match=name):
            interpolate(raw, others | {name: ""})  # `:?` also refuses an empty value

    required = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*:\?[^}]*\}$")
    envs = [compose["x-ddpm-env"]] + [svc.get("environment", {}) for svc in compose["services"].values()]
    for env in envs:
        for key, value in env.items():
            if key in OPTIONAL_SECRETS:  # off when empty, never a literal
                assert value == f"${{{key}:-}}", f"{key} must be ${{{key}:-}}, not {value!r}"
            elif re.search("PASSWORD|SECRET|TOKEN", key):
                assert required.match(str(value)), f"{key} must be ${{VAR:?message}}, not {value!r}"
            for userinfo in re.findall(r"://([^@/\s]+)@", str(value)):
                _, _, password = userinfo.partition(":")
                assert required.match(password), f"{key} carries a literal password"


def test_worker_has_one_nvidia_gpu_and_time_to_checkpoint(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "${CUDA_VISIBLE_DEVICES:-0}"
    assert worker["stop_grace_period"] == "2m"
    assert "checkpoints:/data/checkpoints" in worker["volumes"]
    # The API writes uploads (POST /v1/datasets) into the checkpoint volume before a worker prepares them.
    assert "checkpoints:/data/checkpoints" in services["api"]["volumes"]


def test_datasets_reach_the_workers_and_the_api_read_only(raw: str, services: dict[str, dict[str, Any]]) -> None:
    """The volume sits at the data root the services' settings give (Settings.data_roots)."""
    for name in WORKERS:
        assert DATASETS_MOUNT in services[name]["volumes"], name
    assert DATASETS_MOUNT + ":ro" in services["api"]["volumes"]
    env = yaml.safe_load(interpolate(raw, SECRETS))["services"]["worker"]["environment"]
    assert Settings(data_dir=env["DDPM_DATA_DIR"]).data_roots == [Path("/data/datasets")]
    named = yaml.safe_load(interpolate(raw, SECRETS))["services"]
    assert "datasets:/data/datasets" in named["worker"]["volumes"]  # the named volume, by default
    bound = yaml.safe_load(interpolate(raw, SECRETS | {"DATASETS_DIR": "/srv/datasets"}))["services"]
    assert "/srv/datasets:/data/datasets:ro" in bound["api"]["volumes"]  # or a host folder


def test_more_workers_one_per_gpu_or_one_for_all(services: dict[str, dict[str, Any]]) -> None:
    """worker-gpu1: the same worker on the host's GPU 1 (seen as device 0); worker-node: every GPU,
    for multi-GPU jobs, with the shared memory NCCL wants."""
    gpu1, node = services["worker-gpu1"], services["worker-node"]
    assert gpu1["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert gpu1["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert node["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    assert "CUDA_VISIBLE_DEVICES" not in node["environment"]
    assert node["shm_size"]
    for worker in (gpu1, node):
        assert worker["stop_grace_period"] == "2m"
        assert worker["volumes"] == services["worker"]["volumes"]
        assert worker["depends_on"] == services["worker"]["depends_on"]


def test_samples_worker_draws_samples_only_beside_the_training_worker(
    raw: str, services: dict[str, dict[str, Any]]
) -> None:
    """worker-samples: the worker's image and entrypoint, on the same GPU, consuming only the
    samples queue (the role `ddpm-jobs serve` gives its second worker)."""
    samples, worker = services["worker-samples"], services["worker"]
    assert "profiles" not in samples  # starts with a plain `docker compose up`
    assert samples["environment"]["DDPM_WORKER_ROLE"] == "samples"
    assert samples["environment"]["CUDA_VISIBLE_DEVICES"] == worker["environment"]["CUDA_VISIBLE_DEVICES"]
    assert samples["deploy"] == worker["deploy"]
    assert samples["volumes"] == worker["volumes"] and samples["depends_on"] == worker["depends_on"]
    env = yaml.safe_load(interpolate(raw, SECRETS))["services"]["worker-samples"]["environment"]
    values = {k.removeprefix("DDPM_").lower(): v for k, v in env.items() if k.startswith("DDPM_")}
    assert Settings(**values).worker_role == "samples"


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name


def test_api_port_and_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    from app.health import router

    api = services["api"]
    assert api["environment"]["DDPM_HOST"] == "0.0.0.0"
    assert api["ports"] == ["${DDPM_PORT:-8000}:8000"]
    test = api["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", test[3])
    assert url and url[1] == "8000" and url[2] in {route.path for route in router.routes}
    compile(test[3], "healthcheck", "exec")


# --- the Dockerfiles -------------------------------------------------------------------------


def test_every_build_has_its_dockerfile_and_sources(services: dict[str, dict[str, Any]]) -> None:
    built = {name: svc["build"] for name, svc in services.items() if "build" in svc}
    assert set(built) == {"migrate", "api", "worker", "worker-samples", "worker-gpu1", "worker-node"}
    for name, build in built.items():
        context = ROOT / build["context"]
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for src in copy_sources(dockerfile):
            assert (context / src).exists(), f"{dockerfile.name} copies {src}, which is missing"
    assert built["migrate"] == built["api"] and built["api"]["dockerfile"] == "docker/api.Dockerfile"
    assert built["worker"]["dockerfile"] == "docker/worker.Dockerfile"
    assert built["worker-gpu1"] == built["worker-node"] == built["worker-samples"] == built["worker"]


def test_api_dockerfile_has_no_torch() -> None:
    text = API_DOCKERFILE.read_text().lower()
    instructions = dockerfile_instructions(API_DOCKERFILE)
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "pip install" in runs and "[worker]" not in runs and "torch" not in runs
    assert not any(src.startswith("worker") for src in copy_sources(API_DOCKERFILE))
    assert "pytorch" not in text and "cuda" not in text
    assert ("USER", "ddpm") in instructions
    assert json.loads(dict(instructions)["CMD"]) == ["ddpm-jobs", "api"]


def test_worker_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    """torch as the tests run it and the Makefile installs it, from a CUDA index, on a base with a
    C compiler (torch.compile: pytorch#116696) and the API image's Python."""
    instructions = dockerfile_instructions(WORKER_DOCKERFILE)
    assert dict(instructions)["FROM"] == dict(dockerfile_instructions(API_DOCKERFILE))["FROM"] == "python:3.11-slim"
    args = dict(arg.split("=", 1) for kw, arg in instructions if kw == "ARG")
    makefile = re.search(r"^TORCH_DEFAULT := torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile and args["TORCH_VERSION"] == makefile[1] == services["worker"]["build"]["args"]["TORCH_VERSION"]
    floor = re.fullmatch(
        r"torch>=(\d+)\.(\d+)",
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"][0],
    )
    assert floor and tuple(map(int, args["TORCH_VERSION"].split(".")[:2])) >= (int(floor[1]), int(floor[2]))
    assert installed_version("torch").split("+")[0] == args["TORCH_VERSION"]  # the torch these tests run
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    assert services["worker"]["build"]["args"]["TORCH_INDEX_URL"] == f"${{TORCH_INDEX_URL:-{args['TORCH_INDEX_URL']}}}"
    runs = [arg for kw, arg in instructions if kw == "RUN"]
    compiler = next(i for i, r in enumerate(runs) if "apt-get install" in r)
    assert {"gcc", "g++"} <= set(runs[compiler].split())
    torch = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch]
    assert torch < next(i for i, r in enumerate(runs) if '".[worker]"' in r)  # so pip keeps that build
    assert ("USER", "ddpm") in instructions
    assert json.loads(dict(instructions)["CMD"]) == WORKER_COMMAND


def test_dockerignore_keeps_local_state_out() -> None:
    entries = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", "test-artifacts", "**/__pycache__"} <= entries


def test_api_image_installs_without_torch(tmp_path: Path) -> None:
    """Build the wheel from what api.Dockerfile copies (no worker/): torch only under the extra."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in copy_sources(API_DOCKERFILE):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():  # a missing file is test_every_build_has_its_dockerfile_and_sources's to report
            shutil.copy2(path, src / name)
    assert not (src / "worker").exists()
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("ddpm_jobs-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()

    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    ml = [r for r in requires if re.match(r"(torch|diffusers|safetensors)\b", r, re.I)]
    assert ml, "the worker extra's requirements are missing from METADATA"
    for req in ml:
        assert re.search(r"""extra\s*==\s*["']worker["']""", req), f"{req} is not confined to the worker extra"
    assert re.search(r"^ddpm-jobs\s*=\s*app\.cli:main$", entry_points, re.M)
    # `ddpm-jobs migrate` finds the Alembic scripts next to the installed `app` package.
    assert "app/cli.py" in names and "migrations/env.py" in names
    assert any(re.fullmatch(r"migrations/versions/\w+\.py", n) for n in names)
    assert not any(n.startswith("worker/") for n in names)
    # The dashboard ships in the package (package-data), so the API image serves it.
    assert "app/web/static/index.html" in names and "app/web/static/vendor/chart.umd.min.js" in names


# --- the workers' healthcheck ----------------------------------------------------------------


def healthcheck(services: dict[str, dict[str, Any]], name: str, health_file: Path) -> int:
    """Run service `name`'s healthcheck command here, as Docker would in its container."""
    test = services[name]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    env = {"PATH": "/usr/bin:/bin", "DDPM_WORKER_HEALTH_FILE": str(health_file)}
    return subprocess.run([sys.executable, *test[2:]], env=env, capture_output=True, timeout=30).returncode


def test_every_worker_has_the_heartbeat_healthcheck(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    check = services["worker"]["healthcheck"]
    for name in WORKERS:
        assert services[name]["healthcheck"] == check, name
        assert services[name]["environment"]["DDPM_WORKER_HEALTH_FILE"].startswith("/"), name
    assert check["start_period"] == "2m"  # torch's import and the broker come before the first sweep
    alive = tmp_path / "alive"
    assert healthcheck(services, "worker", alive) != 0  # absent: not started, or stopped
    alive.touch()
    assert healthcheck(services, "worker", alive) == 0
    old = time.time() - 120
    os.utime(alive, (old, old))
    assert healthcheck(services, "worker", alive) != 0  # the sweeper stopped checking in


@pytest.mark.slow
@pytest.mark.e2e
def test_a_running_worker_passes_its_healthcheck_and_a_stopped_one_fails(
    services: dict[str, dict[str, Any]], settings_env: dict[str, str], tmp_path: Path
) -> None:
    alive = tmp_path / "alive"
    log = tmp_path / "worker.log"
    with process(worker_argv(), settings_env | {"DDPM_WORKER_HEALTH_FILE": str(alive)}, log) as worker:
        deadline = time.monotonic() + 120
        while healthcheck(services, "worker", alive) != 0:
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no heartbeat file after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(1)
    assert worker.returncode is not None
    assert not alive.exists()
    assert healthcheck(services, "worker", alive) != 0
