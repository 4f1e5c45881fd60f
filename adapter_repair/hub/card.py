"""The model card of a repaired adapter, written through huggingface_hub's ModelCard.

An existing card keeps its content: the repair section lives between two HTML comments and is
added, or replaced on a second repair; its metadata gains ``base_model``, the tags
``adapter-repair`` and ``safety``, and the before/after measures as model-index metrics (ours
are marked ``source_name: adapter-repair`` and replaced, the card's other results kept).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from adapter_repair.repair.report import COLUMNS, ROWS, measures_table, task_guard, verdict

START = "<!-- adapter-repair:start -->"
END = "<!-- adapter-repair:end -->"
TAGS = ("adapter-repair", "safety")
SOURCE_NAME = "adapter-repair"
SOURCE_URL = "https://pypi.org/project/adapter-repair/"
#: measure key -> (dataset type, dataset name) of the model-index entry
DATASETS = {
    "harmful_rate": ("walledai/AdvBench", "AdvBench (eval split)"),
    "harmful_rate_xstest": ("natolambert/xstest-v2-copy", "XSTest (unsafe prompts)"),
    "over_refusal": ("natolambert/xstest-v2-copy", "XSTest (safe prompts)"),
    "task_score": ("custom", "task rows given to the repair"),
    "fidelity": ("custom", "benign prompts, agreement with the fine-tuned adapter"),
}


@dataclass(frozen=True)
class Provenance:
    """Where the repaired adapter came from: source and base (repo id or path, and the commit
    sha when they came from the Hub)."""

    source: str
    source_sha: str | None
    base: str
    base_sha: str | None
    tool_version: str
    date: str


def _metrics(report: Mapping[str, Any]) -> list[EvalResult]:
    """The before and after measures as model-index results, in percent."""
    out = []
    measures = report.get("measures") or {}
    labels = {"before": "fine-tuned, before repair", "after": "repaired"}
    for key in (*ROWS, "fidelity"):
        for col, label in labels.items():
            m = (measures.get(col) or {}).get(key)
            if not m:
                continue
            dataset_type, dataset_name = DATASETS[key]
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    metric_type=key,
                    metric_name=f"{key.replace('_', ' ')} % ({label})",
                    metric_value=round(100 * float(m["rate"]), 2),
                    source_name=SOURCE_NAME,
                    source_url=SOURCE_URL,
                )
            )
    return out


def weights_line(sha256: str) -> str:
    """The card's record of the repaired weights: a later upload with other weights (a new
    fine-tune under the same card) is not taken for a repaired adapter."""
    return f"- repaired weights: `adapter_model.safetensors` sha256 `{sha256}`"


def section(
    report: Mapping[str, Any], provenance: Provenance, weights_sha256: str | None = None
) -> str:
    """The card's repair section (between the START and END markers)."""
    res = report.get("repair") or {}
    rows = measures_table(report.get("measures") or {})
    lines = [
        START,
        "## Safety repair (adapter-repair)",
        "",
        *(
            [
                "This adapter was repaired with"
                " [adapter-repair](https://pypi.org/project/adapter-repair/) so that it refuses"
                " harmful requests again while keeping its task: the same format and rank,"
                " loadable with `PeftModel.from_pretrained` over the same base.",
            ]
            if res.get("reached")
            else [
                "adapter-repair ([adapter-repair](https://pypi.org/project/adapter-repair/))"
                " tried to repair this adapter and **did not reach its target**: it may still"
                " answer harmful requests its base refuses. The numbers below say how far it"
                " got.",
            ]
        ),
        "",
        f"**{verdict(res)}**",
        "",
    ]
    if rows:
        lines += [
            "| measure | " + " | ".join(name for _, name in COLUMNS) + " |",
            "|---|---|---|---|",
            *("| " + " | ".join(r) + " |" for r in rows),
            "",
            "Rates with 95% Wilson intervals.",
            "",
        ]
    else:
        lines += ["Not measured (the repair ran with --no-measure).", ""]
    changed = res.get("changed")
    lines += [
        f"- method: {report.get('method')}; stopped: {res.get('stopped')}"
        + (f"; {100 * changed:.2f}% of the adapter's coordinates changed" if changed else ""),
        f"- source: `{provenance.source}`"
        + (f" at `{provenance.source_sha}`" if provenance.source_sha else ""),
        f"- base: `{provenance.base}`"
        + (f" at `{provenance.base_sha}`" if provenance.base_sha else "")
        + f" (repaired over it loaded as {report.get('quant')})",
        f"- {task_guard(report)}",
        f"- adapter-repair {provenance.tool_version}, {provenance.date}",
        # the bot skips weights its card records as repaired: never a repair that fell short
        *([weights_line(weights_sha256)] if weights_sha256 and res.get("reached") else []),
        "",
        "<details><summary>Settings</summary>",
        "",
        "```json",
        json.dumps(res.get("settings"), indent=2, sort_keys=True),
        "```",
        "",
        "</details>",
        "",
        "The full report is in `repair_report.md` and `repair_report.json` beside the adapter.",
        END,
    ]
    return "\n".join(lines)


def _empty_base_tag(tag: Any) -> bool:
    """``base_model:adapter:`` with no id; YAML reads that line as the mapping
    ``{"base_model:adapter": None}``, which is no tag at all."""
    if isinstance(tag, dict):
        return all(str(k).startswith("base_model") and not v for k, v in tag.items())
    return str(tag).startswith("base_model:") and str(tag).rstrip().endswith(":")


def repair_card(
    existing: str | None,
    report: Mapping[str, Any],
    provenance: Provenance,
    *,
    model_name: str,
    base_model: str | None,
    weights_sha256: str | None = None,
) -> ModelCard:
    """The card for the repaired adapter: ``existing`` (the source's README.md, or None) with
    the repair section added or replaced and the metadata updated."""
    card = ModelCard(existing) if existing and existing.strip() else ModelCard(f"# {model_name}\n")
    data: Any = card.data  # a ModelCardData (CardData's type hides its fields)
    if base_model:
        data.base_model = base_model
    elif not data.base_model:
        data.base_model = None  # an empty base_model is no base at all
    # PEFT's card tags its base as base_model:adapter:ID; one with no id (written from an
    # empty base) names nothing (the Hub derives the tag from base_model)
    tags = [t for t in (data.tags or []) if not _empty_base_tag(t)]
    data.tags = tags + [t for t in TAGS if t not in tags]
    if not getattr(data, "library_name", None):
        data.library_name = "peft"
    kept = [r for r in (data.eval_results or []) if r.source_name != SOURCE_NAME]
    data.eval_results = kept + _metrics(report) or None
    if data.eval_results and not data.model_name:
        data.model_name = model_name
    text = card.text
    new = section(report, provenance, weights_sha256)
    if START in text and END in text[text.index(START) :]:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + new + tail
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
