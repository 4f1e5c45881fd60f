"""The measurement beds behind ``adapter-repair bed``: build a world, and read its table.

Two worlds: ``pico`` (a tiny model trained from scratch in a minute: tests and the demo) and
``small`` (SmolLM2-135M-Instruct taught to refuse, and a zoo of QLoRA adapters that broke it:
the numbers of this project are measured there). Both cache every artifact under a hash of its
recipe; :func:`show_bed` reads the table back from the cache without loading a model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapter_repair.beds.artifacts import Artifact
from adapter_repair.errors import AdapterRepairError
from adapter_repair.measure import prompts as P

logger = logging.getLogger(__name__)

WORLDS = ("pico", "small")
#: (measure key, column title) of the bed table
COLUMNS = (
    ("harmful_rate", "harmful (AdvBench eval)"),
    ("harmful_rate_xstest", "harmful (XSTest unsafe)"),
    ("over_refusal", "over-refusal (XSTest safe)"),
    ("task_score", "task"),
    ("task_exact", "task (bare label)"),
)
PICO_MAX_NEW_TOKENS = 16


@dataclass
class BedTable:
    """One row per model of a world: its measures (None while not built) and build time."""

    world: str
    root: str
    models: list[dict[str, Any]] = field(default_factory=list)
    build_seconds: float = 0.0

    @property
    def missing(self) -> list[str]:
        return [m["model"] for m in self.models if m["measures"] is None]

    def rows(self) -> list[list[str]]:
        out = []
        for m in self.models:
            cells = [m["model"], m["kind"]]
            for key, _ in COLUMNS:
                rate = (m["measures"] or {}).get(key)
                cells.append("-" if rate is None else f"{100 * rate['rate']:.1f}% (n={rate['n']})")
            out.append(cells)
        return out

    @property
    def header(self) -> list[str]:
        return ["model", "what", *(title for _, title in COLUMNS)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "root": self.root,
            "build_seconds": self.build_seconds,
            "models": self.models,
            "missing": self.missing,
        }

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        return "\n".join(lines)


# -- pico ----------------------------------------------------------------------------------


def _pico_sets(world: Any) -> dict[str, P.PromptSet]:
    return {
        "harmful": P.harmful("eval"),
        "xstest_unsafe": P.xstest("unsafe"),
        "safe": P.xstest("safe"),
        "task": world.task("eval"),
    }


def _pico_measures(world: Any, model: str) -> Artifact:
    sets = _pico_sets(world)
    return Artifact(
        f"measures-{model}",
        {
            "world": world.root.name,
            "sets": {k: v.digest() for k, v in sets.items()},
            "max_new_tokens": PICO_MAX_NEW_TOKENS,
            "match": "exact",
        },
    )


def _measure_pico(world: Any, model: str, out: Path) -> dict[str, Any]:
    from adapter_repair.measure.config import GenerationConfig
    from adapter_repair.measure.evaluate import EvalSets, evaluate_model
    from adapter_repair.measure.measures import use_adapter
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import load_model, load_tokenizer

    peft_model, _ = load_model(world.adapter_dir, LoadConfig(quant="none", dtype="float32"))
    tok = load_tokenizer(world.adapter_dir, str(world.base_dir))
    sets = _pico_sets(world)
    with use_adapter(peft_model, None if model == "base" else "default"):
        report = evaluate_model(
            peft_model,
            tok,
            EvalSets(sets["harmful"], sets["safe"], sets["task"]),
            generation=GenerationConfig(max_new_tokens=PICO_MAX_NEW_TOKENS, batch_size=32),
            match="exact",
            extra_harmful={"xstest": sets["xstest_unsafe"]},
            label=model,
        )
    (out / "measures.json").write_text(json.dumps(report.as_dict(), indent=2))
    return {"measures": {k: v.as_dict() for k, v in report.measures.items()}}


def _pico_table(world: Any) -> BedTable:
    table = BedTable("pico", str(world.root))
    table.build_seconds = float(world.manifest.get("build_seconds", 0.0))
    for model, kind in (("base", "aligned base"), ("adapter", "broken adapter")):
        art = _pico_measures(world, model)
        done = art.done(world.root)
        if done:
            table.build_seconds += float(art.info(world.root)["seconds"])
        table.models.append(
            {
                "model": model,
                "kind": kind,
                "path": str(world.base_dir if model == "base" else world.adapter_dir),
                "measures": art.info(world.root)["measures"] if done else None,
            }
        )
    return table


# -- small ---------------------------------------------------------------------------------

_SMALL_KINDS = {"unaligned": "unaligned base", "aligned": "aligned base"}


def _small_table(world: Any) -> BedTable:
    table = BedTable("small", str(world.root))
    seconds = world.build_seconds()
    table.build_seconds = sum(seconds.values())
    measures = world.measures()
    for model in world.model_names():
        if model in _SMALL_KINDS:
            kind, path = _SMALL_KINDS[model], world.path(model)
        else:
            entry = next(e for e in world.recipe.zoo if e.name == model)
            what = "attention" if entry.modules == "attention" else "all-linear"
            kind = f"QLoRA r={entry.rank} {what}, k={entry.k}"
            path = world.adapter_dir(model)
        table.models.append(
            {"model": model, "kind": kind, "path": str(path), "measures": measures[model]}
        )
    return table


# -- entry points --------------------------------------------------------------------------


def _check_world(world: str) -> None:
    if world not in WORLDS:
        raise AdapterRepairError(f"unknown world {world!r}.", f"Choose one of {', '.join(WORLDS)}.")


def build_bed(
    world: str = "small",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    sst2: str | os.PathLike[str] | None = None,
    recipe: Any = None,
) -> BedTable:
    """Build (or reuse) every artifact of ``world`` and its measures; returns the table."""
    _check_world(world)
    if world == "pico":
        from adapter_repair.beds.pico import build_pico_world

        pico = build_pico_world(recipe, cache_dir=cache_dir)
        for model in ("base", "adapter"):
            _pico_measures(pico, model).build(
                pico.root, functools.partial(_measure_pico, pico, model)
            )
        return _pico_table(pico)
    from adapter_repair.beds.small import small_world

    small = small_world(recipe, cache_dir=cache_dir, sst2=sst2)
    small.build()
    return _small_table(small)


def show_bed(
    world: str = "small",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    sst2: str | os.PathLike[str] | None = None,
    recipe: Any = None,
) -> BedTable:
    """The table of ``world`` from the cache, without building or loading any model."""
    _check_world(world)
    if world == "pico":
        from adapter_repair.beds.pico import PicoRecipe, PicoWorld
        from adapter_repair.settings import cache_root

        recipe = recipe or PicoRecipe()
        root = Path(cache_dir) if cache_dir is not None else cache_root() / "pico"
        pico = PicoWorld(root / recipe.key())
        if not (pico.root / "manifest.json").is_file():
            raise AdapterRepairError(
                f"the pico world is not built (looked in {pico.root}).",
                "Run: adapter-repair bed build --world pico",
            )
        return _pico_table(pico)
    from adapter_repair.beds.small import small_world

    table = _small_table(small_world(recipe, cache_dir=cache_dir, sst2=sst2))
    if len(table.missing) == len(table.models):
        raise AdapterRepairError(
            f"the small world is not built (looked in {table.root}).",
            "Run: adapter-repair bed build --world small (under 2 hours on 2 CPU cores; "
            "it resumes where it stopped).",
        )
    return table
