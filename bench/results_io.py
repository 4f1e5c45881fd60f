"""What every benchmark ends with: the machine it ran on, and its table written to
bench/results/NAME.md beside its data as NAME.json."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The line each table names its machine by."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"


def write_results(name: str, md: list[str], payload: Any) -> None:
    """bench/results/NAME.md (the lines joined) and NAME.json."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
