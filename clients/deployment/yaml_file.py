"""Reading a site's own YAML files (its settings file, its trusted publishers) with one kind of error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_file(path: Path, error: type[Exception], what: str) -> Any:
    """The parsed file; an unreadable file or bad YAML raises ``error`` naming ``what`` and the path."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise error(f"{path} is not YAML: {err}") from None
