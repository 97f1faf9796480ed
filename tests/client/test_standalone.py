"""The client stands alone: the `ddpm` command, finding its key, loads nothing of the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SERVER_PACKAGES = {"sqlalchemy", "alembic", "uvicorn", "fastapi", "starlette", "celery", "kombu", "boto3", "torch"}


def test_the_cli_and_its_key_lookup_load_no_server_package(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "import app.client.cli\n"
        "from app.client.api import resolve_api_key\n"
        "resolve_api_key()\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    env = {"DDPM_DATA_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert SERVER_PACKAGES & set(json.loads(done.stdout)) == set()
