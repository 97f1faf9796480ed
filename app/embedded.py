"""Where the embedded default lives: its address, its data folder and the key file it saves.

`ddpm-jobs serve` listens on DDPM_HOST:DDPM_PORT and saves its first admin key in
`$DDPM_DATA_DIR/api-key`; the `ddpm` client, given no server or key, looks in the same places.
Both take the rule from here. The client must stand alone, so this module imports nothing but
the standard library (the service's Settings would bring SQLAlchemy and the rest with it).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_DATA_DIR = Path("var")
DATA_DIR_VARIABLE = "DDPM_DATA_DIR"
# `serve` puts its pid here in its workers' environment: they stop when it dies (worker/shutdown.py).
PARENT_VARIABLE = "DDPM_STOP_WITH_PARENT"


def api_key_path(data_dir: Path) -> Path:
    """The embedded service's first admin key, readable by its owner only."""
    return data_dir / "api-key"


def data_dir_from_environment() -> Path:
    """The data folder `Settings.data_dir` resolves to, read from the environment alone."""
    value = os.environ.get(DATA_DIR_VARIABLE)
    return DEFAULT_DATA_DIR if value is None else Path(value)
