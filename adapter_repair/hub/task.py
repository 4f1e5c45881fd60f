"""Task rows from a dataset on the Hub: the ones an adapter names in its card, or ``--task
hub:owner/dataset[@revision][:split]``.

Why: the most common call, ``adapter-repair fix user/lora --pr``, has no task file, and the
fidelity guard that runs without one could not keep an unseen task (bench/results/max_kl.md).
Most published adapters name their training data in the card's ``datasets:``; its rows are
what the adapter learnt, so they make the task guard and the held-out task score.

The dataset is pinned by commit sha like the adapter, only its data files and card come down
(through huggingface_hub, into its cache), and the ``datasets`` library reads them, so its
layouts (jsonl, json, parquet, csv, the card's ``configs:``) are read as the Hub reads them.
The rows then go through :func:`~adapter_repair.measure.prompts.prompt_set_from_rows`: chat
``messages``, prompt/completion, Alpaca, question/answer, or the columns the user names.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download

from adapter_repair.errors import AdapterRepairError
from adapter_repair.hub.config import HUB_PREFIX
from adapter_repair.hub.errors import hub_errors
from adapter_repair.measure.prompts import PromptSet, PromptSetError, hash_unit
from adapter_repair.measure.prompts import prompt_set_from_rows as rows_to_prompts

logger = logging.getLogger(__name__)

#: data files a dataset repo may hold that ``datasets`` reads (no loading scripts: they run
#: code, and the Hub no longer serves them)
DATA_FILES = ["*.jsonl", "*.json", "*.parquet", "*.csv", "*.jsonl.gz", "*.json.gz", "*.csv.gz"]
DATASET_FILES = ["README.md", *DATA_FILES, *(f"**/{p}" for p in DATA_FILES)]
#: Most rows taken from a Hub dataset (chosen by a seeded hash of the prompt, never file
#: order): enough for the guard's 256 and a steady score, few enough to measure quickly.
HUB_TASK_ROWS = 1024
#: owner/name, optionally @revision, optionally :split
DATASET_REF = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?::(?P<split>[\w.-]+))?$"
)
HUB_SALT = "hub-task-rows\x00"


class TaskSourceError(AdapterRepairError):
    """A Hub dataset could not give task rows: missing, gated, unreadable, no usable
    columns, or an empty split."""


@dataclass(frozen=True)
class DatasetRef:
    """A dataset repo on the Hub, a revision (None: the default branch) and a split (None:
    ``train``, or the only split there is)."""

    repo_id: str
    revision: str | None = None
    split: str | None = None

    @classmethod
    def parse(cls, text: str) -> DatasetRef:
        """``owner/name[@revision][:split]``, with or without the ``hub:`` prefix."""
        m = DATASET_REF.match(text.removeprefix(HUB_PREFIX))
        if not m:
            raise TaskSourceError(
                f"{text!r} is not a Hub dataset reference.",
                "Write --task hub:owner/dataset, optionally with @revision and :split "
                "(hub:owner/dataset@main:train).",
            )
        return cls(m["repo"], m["rev"], m["split"])

    def __str__(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return text + (f":{self.split}" if self.split else "")


@dataclass(frozen=True)
class HubTask:
    """Task rows read from a Hub dataset, and where they came from (for the report)."""

    rows: PromptSet
    record: dict[str, Any]


def card_datasets(folder: Path) -> list[str]:
    """The dataset repo ids an adapter's card names in its YAML header (``datasets:``), in
    order; none when there is no card or it names none."""
    from huggingface_hub import ModelCard

    card_path = folder / "README.md"
    if not card_path.is_file():
        return []
    try:
        data = ModelCard.load(card_path).data
    except Exception as e:  # a card we cannot parse names no dataset; said, not fatal
        logger.warning("could not read the card's header in %s: %s", card_path, e)
        return []
    names = getattr(data, "datasets", None)
    if isinstance(names, str):
        names = [names]
    return [str(n) for n in names or [] if isinstance(n, str) and DATASET_REF.match(n)]


def pull_task(
    ref: DatasetRef,
    *,
    api: HfApi | None = None,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    max_rows: int = HUB_TASK_ROWS,
) -> HubTask:
    """The task rows of ``ref``: resolved to a commit sha, its data files downloaded, read
    with ``datasets``, at most ``max_rows`` of them (a seeded hash of the prompt picks which).
    Every failure is a :class:`TaskSourceError` or a
    :class:`~adapter_repair.hub.errors.HubError` that says what to pass instead."""
    api = api or HfApi()
    what = f"read the task dataset {ref.repo_id}"
    with hub_errors(what, ref.repo_id):
        info = api.dataset_info(ref.repo_id, revision=ref.revision)
    sha = str(info.sha)
    names = [s.rfilename for s in info.siblings or []]
    at = f"{ref.repo_id}@{sha[:8]}"
    data_files = [n for n in names if any(Path(n).match(p) for p in DATA_FILES)]
    if not data_files:
        scripts = [n for n in names if n.endswith(".py")]
        raise TaskSourceError(
            f"the dataset {at} has no data files adapter-repair can read"
            + (" (only a loading script, which would run code)" if scripts else "")
            + f" (its files: {', '.join(names) or 'none'}).",
            "Pass your task rows with --task FILE (csv or jsonl), or a dataset with jsonl, "
            "json, parquet or csv files with --task hub:owner/dataset.",
        )
    with hub_errors(what, ref.repo_id):
        path = Path(
            snapshot_download(
                ref.repo_id,
                repo_type="dataset",
                revision=sha,
                allow_patterns=DATASET_FILES,
                endpoint=api.endpoint,
                token=api.token,
            )
        )
    split, table, columns = _read_split(path, ref, at)
    if not table:
        raise TaskSourceError(
            f"the split {split!r} of the dataset {at} is empty.",
            f"Pick a split with rows: --task hub:{ref.repo_id}:SPLIT.",
        )
    where = f"the dataset {at} ({split})"
    chosen = sorted(range(len(table)), key=lambda i: hash_unit(HUB_SALT + _row_key(table[i])))[
        : max_rows or None
    ]
    rows = [table[i] for i in sorted(chosen)]
    try:
        prompts = rows_to_prompts(
            rows,
            columns,
            name=f"{ref.repo_id}:{split}",
            where=where,
            column=prompt_column,
            answer_column=answer_column,
            require_answers=True,
        )
    except PromptSetError as e:
        raise TaskSourceError(
            e.problem,
            f"{e.fix} Or pass your task rows with --task FILE.",
        ) from e
    logger.info("task rows: %d of %d from %s", len(prompts), len(table), where)
    record = {
        "hub": ref.repo_id,
        "revision": ref.revision,
        "sha": sha,
        "split": split,
        "rows": len(prompts),
        "of": len(table),
        "prompt_column": prompt_column,
        "answer_column": answer_column,
    }
    return HubTask(prompts, record)


def _row_key(row: Mapping[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in row.items()))


def _read_split(
    path: Path, ref: DatasetRef, at: str
) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(split name, rows, columns) of ``ref``'s split in the downloaded folder ``path``, read
    by ``datasets`` (class labels as their names, so a choice task's answers are words)."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="adapter-repair-task-") as cache:
        was = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            loaded = datasets.load_dataset(str(path), cache_dir=cache)
        except Exception as e:  # datasets raises many types for files it cannot read
            empty = sorted(
                f.relative_to(path).as_posix()
                for pattern in DATA_FILES
                for f in path.rglob(pattern)
                if f.is_file() and f.stat().st_size == 0
            )
            if empty:
                raise TaskSourceError(
                    f"the dataset {at} has empty data files ({', '.join(empty)}): a split "
                    "with no rows.",
                    "Fill the files in, or pass your task rows with --task FILE.",
                ) from e
            cause = e.__cause__ or e
            raise TaskSourceError(
                f"the dataset {at} could not be read: {type(cause).__name__}: "
                f"{(str(cause) or 'no detail').splitlines()[0]}",
                "Pass your task rows with --task FILE (csv or jsonl), or name a dataset whose "
                "files are jsonl, json, parquet or csv.",
            ) from e
        finally:
            if was:
                datasets.enable_progress_bars()
        splits = list(loaded)
        split = ref.split or ("train" if "train" in splits or len(splits) != 1 else splits[0])
        if split not in loaded:
            raise TaskSourceError(
                f"the dataset {at} has no split {split!r} (its splits: {', '.join(splits)}).",
                f"Name one: --task hub:{ref.repo_id}:{splits[0] if splits else 'SPLIT'}.",
            )
        table = loaded[split]
        columns = list(table.column_names)
        names = {
            c: feature.int2str
            for c, feature in table.features.items()
            if isinstance(feature, datasets.ClassLabel)
        }
        rows = [
            {c: (names[c](v) if c in names and isinstance(v, int) else v) for c, v in r.items()}
            for r in table.to_list()
        ]
    return split, rows, columns


def task_from_card(
    folder: Path,
    *,
    api: HfApi | None = None,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    max_rows: int = HUB_TASK_ROWS,
) -> HubTask | None:
    """Task rows from the first dataset the adapter's card names; None when it names none.
    A named dataset that cannot be read raises (with what to pass), before any repair."""
    names = card_datasets(folder)
    if not names:
        return None
    failures: list[str] = []
    for name in names:
        try:
            return pull_task(
                DatasetRef.parse(name),
                api=api,
                prompt_column=prompt_column,
                answer_column=answer_column,
                max_rows=max_rows,
            )
        except AdapterRepairError as e:
            if getattr(e, "transient", False):
                raise
            failures.append(e.problem)
    raise TaskSourceError(
        f"the adapter's card names its training data ({', '.join(names)}), but no task rows "
        f"could be read from it: {'; '.join(failures)}",
        "Pass the task rows yourself: --task FILE (csv or jsonl) or --task "
        "hub:owner/dataset[:split] (with --prompt-column/--answer-column if needed); or "
        "--no-card-task to guard with fidelity on benign prompts instead.",
    )


def describe(record: Mapping[str, Any]) -> str:
    """One line for a log or a card: which rows guarded the task."""
    return (
        f"{record['rows']} rows of {record['hub']}@{str(record['sha'])[:12]} "
        f"({record['split']}, of {record['of']})"
    )


__all__: Sequence[str] = [
    "DatasetRef",
    "HubTask",
    "TaskSourceError",
    "card_datasets",
    "describe",
    "pull_task",
    "task_from_card",
]
