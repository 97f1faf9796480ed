"""Reading a job spec file, JSON or YAML: one way for both command lines.

`ddpm submit` sends the spec it reads to the API and `ddpm-train` trains it locally; both read
the file here, so the same file means the same spec to both. The result is the plain mapping a
user would POST; `app.spec.JobSpec` validates it.

The client shares this module with the server and the ML core, so it imports only PyYAML and the
standard library: nothing of the server (SQLAlchemy, FastAPI, Celery), not torch, not Pydantic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml


class SpecFileError(ValueError):
    """A spec file that cannot be read, is neither JSON nor YAML, or does not hold a mapping."""


class SpecYamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only) that also reads YAML 1.2 floats: `2e-4`, `1E5`.

    YAML 1.1, which PyYAML implements, reads `2e-4` as a string (its floats need a dot), and the
    strict spec then refuses the learning rate a user wrote; a spec means the number."""


SpecYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    # What YAML 1.1 leaves out: an exponent without a dot or without a sign (`.5`, `1.5` it reads).
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_spec_document(text: str, source: str) -> dict[str, Any]:
    """The mapping a JSON or YAML spec document holds; `source` names it in errors.

    JSON is read as JSON (the API's own format; also what YAML cannot read, such as tab
    indentation), anything else as YAML with `SpecYamlLoader`. An empty document is `{}`."""
    try:
        document = json.loads(text)
    except ValueError as json_error:
        try:
            document = yaml.load(text, Loader=SpecYamlLoader)
        except yaml.YAMLError as yaml_error:
            # The complaint that helps is the one about the format the author meant to write.
            meant_json = text.lstrip().startswith(("{", "["))
            reason = json_error if meant_json else yaml_error
            raise SpecFileError(f"{source} is neither JSON nor YAML: {reason}") from yaml_error
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise SpecFileError(f"{source} must hold a mapping (the job spec), not {type(document).__name__}")
    return document


def read_spec_document(path: Path) -> dict[str, Any]:
    """The mapping in the JSON or YAML spec file at `path` (see `parse_spec_document`)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecFileError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_spec_document(text, str(path))
