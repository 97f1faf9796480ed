"""The import rules of docs/ARCHITECTURE.md, checked over the source's syntax trees.

Every `import` counts, also inside functions and under `if TYPE_CHECKING:`, and the rules hold
transitively: a module may not reach a forbidden package through another module of ours.

- `app/` (the API) imports neither torch, diffusers nor safetensors, nor `worker`: the API image
  installs without the ML stack.
- The ML core (`worker/ddpm/`) imports neither SQLAlchemy, Alembic, Celery nor FastAPI: it reports
  through the sink protocol and knows nothing of databases or queues.
- `worker/` never imports FastAPI.
- `worker/datasets/` (preparing users' data sets) imports neither torch, diffusers nor Celery.
- The client (`app/client/`) stands alone: of ours it imports only itself and the shared,
  server-free modules in CLIENT_SHARED, and none of the server's packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("app", "worker", "migrations", "bench")

ML_STACK = {"torch", "diffusers", "safetensors"}
SERVER_STACK = {"sqlalchemy", "alembic", "celery", "kombu", "fastapi", "starlette", "uvicorn", "psycopg", "boto3"}
# The modules of ours the client shares with the server; each imports nothing of the server (the
# client does not even need app.spec: the server validates what it sends).
CLIENT_SHARED = {"app.status", "app.files", "app.embedded", "app.spec_file"}


@dataclass(frozen=True)
class Rule:
    """Modules under `scope` (a dotted prefix) may not reach `forbidden` (top-level external packages
    or dotted prefixes of ours), directly or through our other modules; `allowed_ours`, when given,
    is the only set of our modules (besides `scope` itself) they may reach."""

    scope: str
    forbidden: frozenset[str]
    allowed_ours: frozenset[str] | None = None


RULES = [
    Rule("app", frozenset(ML_STACK | {"worker"})),
    Rule("worker.ddpm", frozenset(SERVER_STACK)),
    Rule("worker", frozenset({"fastapi", "starlette"})),
    # Preparing a data set needs neither the ML stack nor a queue: the samples-only worker and
    # the API's host never load torch for it (worker/dataset_task.py ties it to the row).
    Rule("worker.datasets", frozenset(ML_STACK | {"celery", "kombu", "fastapi", "starlette", "worker.dataset_task"})),
    Rule("app.client", frozenset(SERVER_STACK | ML_STACK), allowed_ours=frozenset(CLIENT_SHARED)),
]


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """{"app.jobs.service": Path(...), "app.jobs": Path(.../__init__.py), ...} for our packages."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """Every module `path` imports: ours by full dotted name, external ones by top-level name."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to this package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from app.jobs import service` imports the submodule app.jobs.service.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in {m.split(".")[0] for m in modules}:
                # Ours: the module itself and the packages above it (their __init__ runs too).
                parts = target.split(".")
                names.update(p for i in range(1, len(parts) + 1) if (p := ".".join(parts[:i])) in modules)
            else:
                names.add(target.split(".")[0])
    return names


def violations(root: Path, rules: list[Rule], packages: Iterable[str] = OURS) -> list[str]:
    """'<module> -> ... -> <forbidden>' for every chain that breaks a rule (empty when all hold)."""
    modules = module_files(root, packages)
    graph = {name: imported_names(path, name, modules) for name, path in modules.items()}
    found: list[str] = []
    for rule in rules:
        for start in sorted(m for m in modules if m == rule.scope or m.startswith(rule.scope + ".")):
            chain_to = {start: [start]}
            queue = [start]
            while queue:
                current = queue.pop(0)
                for target in sorted(graph[current]):
                    chain = [*chain_to[current], target]
                    if (why := _forbidden(target, rule)) is not None:
                        found.append(" -> ".join([*chain[:-1], why]))
                    elif target in modules and target not in chain_to and _inside(target, rule):
                        chain_to[target] = chain
                        queue.append(target)
    return sorted(set(found))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _inside(name: str, rule: Rule) -> bool:
    """Whether the search follows `name` further: always, unless the rule lists what is allowed
    (then: the scope, the allowed modules, and the packages above them, whose __init__ runs)."""
    if rule.allowed_ours is None or _within(name, rule.scope):
        return True
    return any(_within(allowed, name) for allowed in (*rule.allowed_ours, rule.scope))


def _forbidden(name: str, rule: Rule) -> str | None:
    """What `name` breaks of the rule (the forbidden package it is in, or itself), or None."""
    for prefix in rule.forbidden:
        if _within(name, prefix):
            return prefix
    ours = name.split(".")[0] in OURS
    return name if ours and rule.allowed_ours is not None and not _inside(name, rule) else None


class TestTheRepository:
    @pytest.mark.parametrize("rule", RULES, ids=lambda r: r.scope)
    def test_holds_the_rule(self, rule: Rule) -> None:
        assert violations(ROOT, [rule]) == []

    def test_the_shared_modules_exist(self) -> None:
        assert {name for name in CLIENT_SHARED if name in module_files(ROOT, OURS)} == CLIENT_SHARED


class TestTheChecker:
    """The checker itself, on a small tree written here: it must see what it is meant to catch."""

    def write(self, root: Path, files: dict[str, str]) -> None:
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def test_a_direct_and_a_transitive_import_are_both_caught(self, tmp_path: Path) -> None:
        self.write(
            tmp_path,
            {
                "app/__init__.py": "",
                "app/api.py": "from app import helpers\n",
                "app/helpers.py": "def f():\n    import torch.nn\n",
                "app/direct.py": "from worker.ddpm import trainer\n",
                "worker/__init__.py": "",
                "worker/ddpm/__init__.py": "",
                "worker/ddpm/trainer.py": "import typing\nif typing.TYPE_CHECKING:\n    import sqlalchemy\n",
            },
        )
        assert violations(tmp_path, [Rule("app", frozenset({"torch", "worker"}))], ("app", "worker")) == [
            "app.api -> app.helpers -> torch",
            "app.direct -> worker",
            "app.helpers -> torch",
        ]
        assert violations(tmp_path, [Rule("worker.ddpm", frozenset({"sqlalchemy"}))], ("app", "worker")) == [
            "worker.ddpm.trainer -> sqlalchemy"
        ]

    def test_the_client_reaches_only_what_it_may(self, tmp_path: Path) -> None:
        self.write(
            tmp_path,
            {
                "app/__init__.py": "",
                "app/spec.py": "import pydantic\n",
                "app/config.py": "import pydantic_settings\n",
                "app/client/__init__.py": "",
                "app/client/cli.py": "from app.spec import JobSpec\nfrom .api import Client\n",
                "app/client/api.py": "from app.config import get_settings\n",
            },
        )
        rule = Rule("app.client", frozenset({"sqlalchemy"}), allowed_ours=frozenset({"app.spec"}))
        assert violations(tmp_path, [rule], ("app",)) == [
            "app.client.api -> app.config",
            "app.client.cli -> app.client.api -> app.config",
        ]
