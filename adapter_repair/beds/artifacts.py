"""A content-addressed artifact cache: each artifact is a folder named by a hash of its recipe.

A recipe payload names everything the artifact depends on, including the keys of the artifacts
it was built from, so a changed input rebuilds exactly what depends on it and nothing else. A
folder is built under a temporary name and renamed when complete, so an interrupted build
leaves no half artifact and resumes at the artifact it was on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DONE = "artifact.json"


def recipe_key(payload: Any) -> str:
    """16 hex digits of the sha256 of the payload's canonical JSON."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A named recipe; its folder is ``<root>/<name>-<key>``."""

    name: str
    payload: Any

    @property
    def key(self) -> str:
        return recipe_key({"name": self.name, "recipe": self.payload})

    def path(self, root: Path) -> Path:
        return root / f"{self.name}-{self.key}"

    def done(self, root: Path) -> bool:
        return (self.path(root) / DONE).is_file()

    def info(self, root: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path(root) / DONE).read_text())
        return data

    def build(
        self, root: Path, make: Callable[[Path], dict[str, Any] | None], *, rebuild: bool = False
    ) -> Path:
        """Return the artifact's folder, calling ``make(tmp_folder)`` first unless it exists.

        ``make`` writes into the folder it is given and may return facts to record (losses,
        counts); the build time is recorded too.
        """
        final = self.path(root)
        if self.done(root) and not rebuild:
            logger.info("reusing %s", final.name)
            return final
        from adapter_repair.adapter import write_folder_atomically

        t0 = time.perf_counter()
        record: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            logger.info("building %s", final.name)
            facts = make(tmp) or {}
            record.update(name=self.name, key=self.key, seconds=time.perf_counter() - t0)
            record.update(facts, recipe=self.payload)
            (tmp / DONE).write_text(json.dumps(record, indent=2, default=str))

        write_folder_atomically(final, write, overwrite=True)
        seconds = record["seconds"]
        logger.info("built %s in %.1f s", final.name, seconds)
        return final
