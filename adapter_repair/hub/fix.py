"""``adapter-repair fix SOURCE``: a local folder or a Hub repo in, a repaired adapter out, and
(only when asked) pushed to a repo or opened as a pull request, with a model card.

The library repairs local folders and never talks to the Hub; this module resolves what lives
on the Hub into the local cache first (pinned by commit sha), hands the library local paths,
and pushes the output folder as one commit.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants

from adapter_repair.adapter import check_output_folder, same_path
from adapter_repair.errors import AdapterRepairError
from adapter_repair.hub.card import Provenance, repair_card
from adapter_repair.hub.config import PushConfig
from adapter_repair.hub.errors import BaseUnreachableError, HubError
from adapter_repair.hub.pull import HubRef, Pulled, pull_adapter, pull_base
from adapter_repair.hub.push import (
    OwnPr,
    PushPlan,
    PushResult,
    check_can_push,
    find_own_pr,
    landed,
    plan_push,
    pr_marker,
)
from adapter_repair.hub.push import push as push_folder
from adapter_repair.hub.task import DatasetRef, HubTask, describe, pull_task, task_from_card
from adapter_repair.measure.config import EvalConfig, GenerationConfig
from adapter_repair.measure.prompts import PromptSet
from adapter_repair.model.config import LoadConfig
from adapter_repair.repair.config import RepairConfig
from adapter_repair.repair.pipeline import RepairOutcome, repair_folder
from adapter_repair.repair.report import verdict
from adapter_repair.version import __version__

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FixOutcome:
    """What :func:`fix` did: the repair (folder, report), what it pulled, what it pushed."""

    repair: RepairOutcome
    source: Pulled | None
    base: Pulled | None
    pushed: PushResult | None
    #: why a push that was asked for was not made (the repair did not reach its target)
    push_skipped: str | None = None


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def default_out(source: str) -> Path:
    """``NAME-repaired`` in the working folder for a Hub repo; beside a local folder."""
    if _is_local(source):
        p = Path(source).expanduser().resolve()
        return p.parent / f"{p.name}-repaired"
    return Path(f"{HubRef.parse(source).repo_id.split('/')[1]}-repaired")


def _base(
    adapter_base: str | None, load: LoadConfig, api: HfApi, local: bool = True
) -> tuple[LoadConfig, Pulled | None]:
    """The LoadConfig the library gets (a local base path) and what was pulled for it.
    ``local=False``: a base named by the adapter's config is only ever a Hub repo (the bot: an
    uploader's config must not make it load a folder of the machine it runs on)."""
    base = load.base or adapter_base
    user_given = load.base is not None
    if base is None:
        return load, None  # the library says that a base is needed
    if (local or user_given) and (_is_local(base) or hf_constants.is_offline_mode()):
        return load, None  # a local folder, or offline: transformers reads the HF cache
    try:
        ref = HubRef.parse(base)
    except AdapterRepairError as e:
        raise BaseUnreachableError(
            f"the base {base!r} is neither a folder on this machine nor a Hub repo id."
            if local or user_given
            else f"the adapter's base_model_name_or_path {base!r} is not a Hub repo id.",
            "Pass --base with the model the adapter was trained on (a Hub id or a local folder).",
        ) from e
    try:
        pulled = pull_base(HubRef(ref.repo_id, load.base_revision or ref.revision), api=api)
    except HubError as e:
        if e.transient:
            raise
        raise BaseUnreachableError(f"the base model: {e.problem}", e.fix) from e
    except AdapterRepairError as e:
        raise BaseUnreachableError(e.problem, e.fix) from e
    return LoadConfig(
        base=str(pulled.path),
        base_revision=None,
        quant=load.quant,
        dtype=load.dtype,
        device_map=load.device_map,
    ), pulled


def _hub_task(
    folder: Path,
    dataset: DatasetRef | None,
    card_task: bool,
    columns: tuple[str | None, str | None],
    api: HfApi,
) -> tuple[PromptSet | None, dict[str, Any] | None]:
    """Task rows from ``dataset``, else from the adapter card's dataset, and their record for
    the report; (None, None) with a one-line warning when there are none."""
    prompt_column, answer_column = columns
    found: HubTask | None
    if dataset is not None:
        found = pull_task(
            dataset, api=api, prompt_column=prompt_column, answer_column=answer_column
        )
    elif card_task:
        found = task_from_card(
            folder, api=api, prompt_column=prompt_column, answer_column=answer_column
        )
    else:
        found = None
    if found is None:
        logger.warning(
            "no task rows: %s the guard is fidelity to the fine-tuned adapter on benign prompts, "
            "which may not keep your task. Pass --task FILE or --task hub:owner/dataset.",
            "the adapter's card names no training dataset (datasets:), so"
            if card_task and dataset is None
            else "--no-card-task, so",
        )
        return None, None
    logger.info("task rows: %s", describe(found.record))
    return found.rows, found.record


def _card_base(pulled: Pulled | None, given: str | None, recorded: str | None) -> str | None:
    """The base the card names: the Hub repo the base was pulled from, else the first of the
    user's --base and the adapter config's base_model_name_or_path that is a Hub id (a local
    folder means nothing on the Hub)."""
    if pulled is not None:
        return pulled.repo_id
    for name in (given, recorded):
        if not name or _is_local(name):
            continue
        try:
            return HubRef.parse(name).repo_id
        except AdapterRepairError:
            continue
    return None


def _recorded_base(folder: Path) -> str | None:
    """The adapter config's ``base_model_name_or_path``; None when there is no readable config
    (the library's loader then says what is wrong with the folder)."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def commit_message(report: Mapping[str, Any]) -> str:
    """One line: what the repair did to the harmful rate, when it was measured."""
    m = report.get("measures") or {}
    before = (m.get("before") or {}).get("harmful_rate")
    after = (m.get("after") or {}).get("harmful_rate")
    if before and after:
        return (
            f"adapter-repair: harmful rate {100 * before['rate']:.1f}% -> "
            f"{100 * after['rate']:.1f}%"
        )
    return f"adapter-repair: repaired adapter ({report.get('method')})"


def fix(
    source: str,
    out: str | Path | None = None,
    *,
    load: LoadConfig | None = None,
    config: RepairConfig | None = None,
    evaluation: EvalConfig | None = None,
    generation: GenerationConfig | None = None,
    task: PromptSet | None = None,
    measure: bool = True,
    overwrite: bool = False,
    push: PushConfig | None = None,
    api: HfApi | None = None,
    min_harmful: float | None = None,
    local_base: bool = True,
    task_file: Mapping[str, Any] | None = None,
    task_dataset: DatasetRef | None = None,
    card_task: bool = True,
    task_columns: tuple[str | None, str | None] = (None, None),
    on_step: Callable[[Any], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> FixOutcome:
    """Repair ``source`` (a local adapter folder, else a Hub repo id ``owner/name[@rev]``)
    into ``out`` (default :func:`default_out`), write its model card, and push it when
    ``push`` asks: to ``push.push_to`` (created when missing), or as a pull request on the
    source repo (``push.pr``); ``push.dry_run`` repairs and plans the push without sending
    it. A repair that did not reach its target pushes nothing (``push_skipped`` says why)
    unless ``push.push_unrepaired``. ``local_base=False`` takes a base named by the adapter's config from the Hub only (the
    bot). ``min_harmful``: raise :class:`~adapter_repair.errors.NothingToRepair` when the
    adapter's measured harmful rate is under it (the bot's threshold). The token comes from
    huggingface_hub (HF_TOKEN, the login cache) and never appears in logs or errors.
    ``task_file`` (where the task rows came from: path, columns) goes into the report's
    provenance, so that the report can rerun the repair. Without ``task``, the task rows come
    from ``task_dataset`` (a Hub dataset), else (``card_task``) from the first dataset the
    adapter's card names (:mod:`adapter_repair.hub.task`; ``task_columns`` names its prompt
    and answer columns), read before any weight comes down; ``on_step`` and ``on_phase`` are
    :func:`~adapter_repair.repair.pipeline.repair_folder`'s progress callbacks."""
    load = load or LoadConfig()
    push = push or PushConfig()
    pr, push_to, dry_run = push.pr, push.push_to, push.dry_run
    local = _is_local(source)
    if pr and local:
        raise AdapterRepairError(
            f"--pr opens a pull request on the source repo, but {source} is a local folder.",
            "Give a Hub repo id as SOURCE, or push to a repo with --push-to owner/name.",
        )
    ref = None if local else HubRef.parse(source)
    target = push_to or (ref.repo_id if ref and pr else None)
    if push_to is not None:
        HubRef.parse(push_to)  # a clear error for a malformed id, before any work
    api = api or HfApi()
    if target:  # a dry run checks what the real push checks
        check_can_push(api, target, create_pr=pr)
    out_path = Path(out) if out is not None else default_out(source)
    if local and out_path.exists() and same_path(out_path, Path(source)):
        raise AdapterRepairError(
            f"--out {out_path} is the input adapter: refusing to write over the input adapter "
            "(the input is never modified, with or without --overwrite).",
            "Choose a different --out folder.",
        )
    check_output_folder(out_path, overwrite)

    pulled = pull_adapter(ref, api=api) if ref else None
    folder = pulled.path if pulled else Path(source)
    if task is None:
        task, task_file = _hub_task(folder, task_dataset, card_task, task_columns, api)
    adapter_base = _recorded_base(folder)
    lib_load, base = _base(adapter_base, load, api, local_base)
    base_name = load.base or adapter_base or "?"

    existing = (
        (folder / "README.md").read_text(encoding="utf-8")
        if (folder / "README.md").is_file()
        else None
    )
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    provenance = Provenance(
        source=pulled.repo_id if pulled else str(source),
        source_sha=pulled.sha if pulled else None,
        base=base.repo_id if base else base_name,
        base_sha=base.sha if base else None,
        tool_version=__version__,
        date=date,
    )
    model_name = (target or (ref.repo_id if ref else Path(source).name)).split("/")[-1]
    hub_base = _card_base(base, load.base, adapter_base)

    def write_card(folder_out: Path, report: Mapping[str, Any]) -> None:
        weights = hashlib.sha256((folder_out / "adapter_model.safetensors").read_bytes())
        card = repair_card(
            existing,
            report,
            provenance,
            model_name=model_name,
            base_model=hub_base,
            weights_sha256=weights.hexdigest(),
        )
        (folder_out / "README.md").write_text(str(card), encoding="utf-8")

    outcome = repair_folder(
        folder,
        out_path,
        load=lib_load,
        config=config,
        evaluation=evaluation,
        generation=generation,
        task=task,
        measure=measure,
        overwrite=overwrite,
        provenance={**provenance.__dict__, **({"task": dict(task_file)} if task_file else {})},
        also=write_card,
        source_label=f"{pulled.repo_id}@{pulled.sha}" if pulled else None,
        base_label=f"{base.repo_id}@{base.sha}" if base else None,
        min_harmful=min_harmful,
        on_step=on_step,
        on_phase=on_phase,
    )
    pushed = None
    if target and not outcome.result.reached and not push.push_unrepaired:
        skipped = (
            f"nothing pushed to {target}: the repair did not reach its target "
            f"({verdict(outcome.report['repair'])}). The adapter and its report are in "
            f"{outcome.out}; --push-unrepaired pushes such a repair anyway."
        )
        logger.warning(skipped)
        return FixOutcome(outcome, pulled, base, None, skipped)
    if target:
        marker = pr_marker(pulled.sha) if pr and pulled else None
        message = commit_message(outcome.report)
        plan = plan_push(
            outcome.out,
            target,
            create_pr=pr,
            message=f"{message} {marker}" if marker else message,
            description="Repaired with adapter-repair: see the model card's repair section "
            "and repair_report.md.",
        )
        # our own open PR for this source commit gets the new commit, not a second PR
        own = find_own_pr(api, target, marker) if marker else None
        if own is not None:
            logger.info("an open pull request of ours repairs this commit: %s", own.url)
        if dry_run:
            pushed = PushResult(plan, own.url if own else None, None, dry_run=True)
        else:
            pushed = _push_or_say_where(api, outcome.out, plan, push, pulled, own, marker)
            logger.info("pushed: %s", pushed.url)
    return FixOutcome(outcome, pulled, base, pushed)


def _push_or_say_where(
    api: HfApi,
    out: Path,
    plan: PushPlan,
    push: PushConfig,
    pulled: Pulled | None,
    own: OwnPr | None,
    marker: str | None,
) -> PushResult:
    """Push ``plan``; when the push fails in a way that may have landed (the request went out,
    the answer was lost), ask the Hub whether it did: landed -> the push's result; not landed
    or unknown -> a HubError that says which, with advice that never writes to the source
    repo's main branch."""
    try:
        return push_folder(
            api,
            out,
            plan,
            private=push.private,
            parent_commit=pulled.sha if plan.create_pr and pulled else None,
            into=own,
        )
    except AdapterRepairError as e:
        if not getattr(e, "transient", False):
            raise HubError(e.problem, f"{e.fix} {_again(plan, out)}") from e
        try:
            where = landed(api, plan, out / "adapter_model.safetensors", marker)
        except AdapterRepairError:
            raise HubError(
                f"{e.problem} Whether the commit landed is unknown: the Hub could not be asked.",
                f"Check {_target_url(api, plan, own)} before pushing again. {_again(plan, out)}",
                transient=True,
            ) from e
        if where is not None:
            logger.warning("the Hub's answer was lost, but the commit landed: %s", where)
            return PushResult(plan, where, None)
        raise HubError(
            f"{e.problem} Checked on the Hub: the commit did not land, nothing was pushed.",
            f"{e.fix} {_again(plan, out)}",
            transient=True,
        ) from e


def _again(plan: PushPlan, out: Path) -> str:
    """How to push the kept adapter by hand: as a pull request for a PR, never to main."""
    upload = f"hf upload {plan.repo_id} {out}"
    if plan.create_pr:
        upload += " --create-pr"
    return f"The repaired adapter is kept in {out}: push it with `{upload}`, or rerun the same command."


def _target_url(api: HfApi, plan: PushPlan, own: OwnPr | None) -> str:
    if own is not None:
        return own.url
    tab = "/discussions" if plan.create_pr else ""
    return f"{api.endpoint}/{plan.repo_id}{tab}"
