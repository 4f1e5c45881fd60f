"""Push a repaired adapter folder to the Hub as one commit: to a repo (created when missing)
or as a pull request on the source repo.

One ``create_commit`` carries every file, so a push that fails (a dropped connection, a 403)
leaves the target as it was; a repo this push created is deleted again when its first commit
fails. Nothing is pushed unless asked, and ``dry_run`` lists what would be.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import get_token

from adapter_repair.errors import AdapterRepairError
from adapter_repair.hub.errors import HubError, hub_errors, scrub

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushPlan:
    """What a push sends: the target repo, as a PR or to its main branch, and the files."""

    repo_id: str
    create_pr: bool
    files: list[tuple[str, int]] = field(default_factory=list)  #: (path in repo, bytes)
    message: str = ""
    description: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "repo_id": self.repo_id,
            "create_pr": self.create_pr,
            "files": [{"path": p, "bytes": n} for p, n in self.files],
            "message": self.message,
        }


@dataclass(frozen=True)
class PushResult:
    """What a push made: the URL to show (the PR, or the commit), and the commit sha."""

    plan: PushPlan
    url: str | None
    commit_sha: str | None
    dry_run: bool = False


def plan_push(
    folder: Path, repo_id: str, *, create_pr: bool, message: str, description: str = ""
) -> PushPlan:
    """Every file of ``folder`` (not its hidden files), at the same relative path."""
    files = sorted(
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return PushPlan(repo_id, create_pr, files, message, description)


def writer(api: HfApi, doing: str) -> dict[str, Any]:
    """The whoami of a token that can write, for ``doing`` (a phrase: "push to a/b"): a clear
    error when there is no token or it is read-only. Called before long work."""
    if not api.token and get_token() is None:
        raise HubError(
            f"a Hugging Face token is needed to {doing}, and none is set.",
            "Log in with `hf auth login`, or set HF_TOKEN to a token with write access.",
        )
    with hub_errors("check the token", "(whoami)"):
        me: dict[str, Any] = api.whoami()
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(
            f"the token of {me.get('name')} is read-only: it cannot {doing}.",
            "Create a token with write access on the Hub and `hf auth login` with it.",
        )
    return me


def check_can_push(api: HfApi, repo_id: str, *, create_pr: bool) -> str:
    """Fail before a long repair when the push cannot work: no token, a read-only token, or
    (for a new repo) a namespace the token's user is not in. Returns the user's name."""
    me = writer(api, f"push to {repo_id}")
    namespace = repo_id.split("/", 1)[0]
    orgs = {o.get("name") for o in me.get("orgs") or []}
    if not create_pr and namespace != me.get("name") and namespace not in orgs:
        raise HubError(
            f"the token belongs to {me.get('name')}, who cannot create or write {repo_id}.",
            f"Push to your own namespace (--push-to {me.get('name')}/NAME) or open a pull "
            "request on the source repo with --pr.",
        )
    return str(me.get("name"))


def pr_marker(sha: str) -> str:
    """In the titles of the pull requests adapter-repair opens: which source commit was
    repaired (so a later run finds its own PR for that commit)."""
    return f"[{sha[:12]}]"


@dataclass(frozen=True)
class OwnPr:
    """An open pull request this token's user opened on a repo."""

    num: int
    url: str

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


def find_own_pr(api: HfApi, repo_id: str, title_part: str) -> OwnPr | None:
    """The open pull request by this token's user on ``repo_id`` whose title holds
    ``title_part`` (newest first), else None."""
    with hub_errors("check the token", "(whoami)"):
        me = str(api.whoami()["name"])
    with hub_errors("list the repo's pull requests", repo_id):
        found = [
            d
            for d in api.get_repo_discussions(repo_id, author=me, discussion_type="pull_request")
            if d.status == "open" and title_part in d.title
        ]
    if not found:
        return None
    newest = max(found, key=lambda d: d.num)
    return OwnPr(newest.num, str(newest.url))


def push(
    api: HfApi,
    folder: Path,
    plan: PushPlan,
    *,
    private: bool = False,
    parent_commit: str | None = None,
    into: OwnPr | None = None,
) -> PushResult:
    """Send ``plan`` as one commit. A repo created here is deleted again if the commit fails.
    ``parent_commit``: for a pull request, the source commit that was repaired (the PR
    branches from it, whatever the main branch has become since). ``into``: an open pull
    request of ours for the same source commit, which gets the commit instead of a new PR."""
    ops = [
        CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p, _ in plan.files
    ]
    created = False
    if into is not None:
        what = f"update the pull request {into.url}"
    elif plan.create_pr:
        what = f"open a pull request on {plan.repo_id}"
    else:
        what = f"push to {plan.repo_id}"
        with hub_errors(f"create the repo {plan.repo_id}", plan.repo_id, writing=True):
            created = not api.repo_exists(plan.repo_id)
            if created:
                api.create_repo(plan.repo_id, private=private, exist_ok=True)
    logger.info("%s: one commit of %d files", what, len(ops))
    try:
        with hub_errors(what, plan.repo_id, writing=True):
            info = api.create_commit(
                plan.repo_id,
                ops,
                commit_message=plan.message,
                commit_description=plan.description or None,
                create_pr=plan.create_pr and into is None,
                parent_commit=parent_commit if into is None else None,
                revision=into.ref if into is not None else None,
            )
    except AdapterRepairError as e:
        if created and not _may_have_landed(api, folder, plan, e):
            _delete_quietly(api, plan.repo_id)
        raise
    if into is not None:
        return PushResult(plan, into.url, info.oid)
    url = info.pr_url if plan.create_pr else str(info.commit_url)
    return PushResult(plan, url, info.oid)


def _may_have_landed(api: HfApi, folder: Path, plan: PushPlan, error: Exception) -> bool:
    """Whether a failed commit into a repo created for it may be there after all (the
    request went out, the answer was lost): then the repo is kept, not deleted."""
    if not getattr(error, "transient", False):
        return False
    try:
        return landed(api, plan, folder / "adapter_model.safetensors", None) is not None
    except AdapterRepairError:
        return True  # the Hub cannot be asked: keep what may hold the push


def _delete_quietly(api: HfApi, repo_id: str) -> None:
    try:
        api.delete_repo(repo_id)
        logger.info("deleted %s again: the push into it failed", repo_id)
    except (hf_errors.HfHubHTTPError, OSError) as e:
        logger.warning(
            "the push failed and %s, created for it, could not be deleted (%s); it holds no "
            "files of this push",
            repo_id,
            scrub(str(e)).splitlines()[0],
        )


def landed(api: HfApi, plan: PushPlan, weights: Path, marker: str | None) -> str | None:
    """After a push whose answer was lost: where the commit landed (the PR's or the repo's
    URL) when the target now holds these ``weights`` (the pushed adapter_model.safetensors),
    else None. For a pull request, the open PR of ours whose title holds ``marker``. Raises
    HubError when the Hub cannot be asked."""
    data = weights.read_bytes()
    if plan.create_pr:
        pr = find_own_pr(api, plan.repo_id, marker) if marker else None
        if pr is None:
            return None
        revision, url = pr.ref, pr.url
    else:
        with hub_errors(f"check {plan.repo_id}", plan.repo_id):
            if not api.repo_exists(plan.repo_id):
                return None
        revision, url = "main", f"{api.endpoint}/{plan.repo_id}"
    with hub_errors(f"check {plan.repo_id}", plan.repo_id):
        info = api.model_info(plan.repo_id, revision=revision, files_metadata=True)
    for sibling in info.siblings or []:
        if sibling.rfilename != "adapter_model.safetensors":
            continue
        if sibling.lfs is not None:  # an LFS file: its sha256
            same = sibling.lfs.sha256 == hashlib.sha256(data).hexdigest()
        else:  # a plain git file: its blob id
            same = sibling.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return url if same else None
    return None
