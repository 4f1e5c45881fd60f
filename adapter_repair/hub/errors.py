"""Hub failures turned into errors a user can act on.

huggingface_hub raises a dozen exception types with messages written for library authors;
a user of ``adapter-repair fix owner/name`` needs to know which repo, what went wrong and what
to do. :func:`hub_errors` wraps every call we make, and scrubs the token from any message that
could carry it (a URL, a header echoed by a proxy).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import get_token

from adapter_repair.errors import AdapterRepairError

logger = logging.getLogger(__name__)

LOGIN_FIX = "Log in with `hf auth login`, or set HF_TOKEN to a token that can read it."


class HubError(AdapterRepairError):
    """A Hub call failed: not found, not allowed, or the connection broke. ``transient``: a
    dropped connection or a 5xx, worth retrying later (the bot does)."""

    def __init__(self, problem: str, fix: str = "", *, transient: bool = False) -> None:
        super().__init__(problem, fix)
        self.transient = transient


class BaseUnreachableError(HubError):
    """The adapter's base model could not be pulled."""


def scrub(text: str) -> str:
    """``text`` with any Hugging Face token in it replaced by ``hf_***``."""
    token = get_token()
    if token:
        text = text.replace(token, "hf_***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


@contextmanager
def hub_errors(what: str, repo_id: str, *, writing: bool = False) -> Iterator[None]:
    """Run a Hub call for ``what`` (a phrase: "download the adapter") on ``repo_id``; turn
    its failure into a :class:`HubError` with a fix. ``writing`` says that a 401/403 means the
    token cannot write, not that the repo is hidden."""
    import httpx2

    try:
        yield
    except hf_errors.GatedRepoError as e:
        raise HubError(
            f"cannot {what}: {repo_id} is gated and this token has not been granted access.",
            f"Accept the repo's conditions on its Hub page. {LOGIN_FIX}",
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        if writing and _status(e) == 403:
            raise _write_error(what, repo_id) from e
        if writing and _status(e) == 401:
            raise HubError(f"cannot {what}: the Hub refused the token (401).", LOGIN_FIX) from e
        raise HubError(
            f"cannot {what}: the Hub has no repo {repo_id}, or it is private and this "
            "token cannot read it.",
            f"Check the repo id (owner/name). If the repo is private: {LOGIN_FIX}",
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise HubError(
            f"cannot {what}: {repo_id} has no such revision ({scrub(str(e)).splitlines()[0]}).",
            "Give an existing branch, tag or commit sha after @ (owner/name@main).",
        ) from e
    except hf_errors.RemoteEntryNotFoundError as e:
        raise HubError(
            f"cannot {what}: a file is missing in {repo_id} ({scrub(str(e)).splitlines()[0]}).",
            "Check that the repo holds the files this step needs.",
        ) from e
    except hf_errors.HfHubHTTPError as e:
        status = _status(e)
        if status == 403 and writing:
            raise _write_error(what, repo_id) from e
        if status == 401:
            raise HubError(f"cannot {what}: the Hub refused the token (401).", LOGIN_FIX) from e
        if status == 403:
            raise HubError(
                f"cannot {what}: this token may not access {repo_id} (403).", LOGIN_FIX
            ) from e
        raise HubError(
            f"cannot {what} ({repo_id}): the Hub answered {status}: "
            f"{scrub(str(e)).splitlines()[0]}",
            "Retry later; if it persists, check the Hub's status page.",
            transient=status is None or status >= 500 or status == 429,
        ) from e
    except hf_errors.LocalEntryNotFoundError as e:  # a download that failed mid-way
        raise HubError(
            f"cannot {what} ({repo_id}): the files could not be downloaded "
            f"({scrub(str(e)).splitlines()[0]}).",
            "Check the network (and HF_ENDPOINT) and run the same command again: downloads "
            "resume from the cache.",
            transient=True,
        ) from e
    except hf_errors.LocalTokenNotFoundError as e:
        raise HubError(f"cannot {what}: no Hugging Face token is set.", LOGIN_FIX) from e
    except hf_errors.OfflineModeIsEnabled as e:
        raise HubError(
            f"cannot {what} ({repo_id}): HF_HUB_OFFLINE is set.",
            "Unset HF_HUB_OFFLINE to reach the Hub, or give a local adapter folder.",
        ) from e
    except (httpx2.TransportError, ConnectionError, TimeoutError) as e:
        raise HubError(
            f"cannot {what} ({repo_id}): the connection to the Hub failed "
            f"({type(e).__name__}: {scrub(str(e))}).",
            "Check the network (and HF_ENDPOINT) and run the same command again: a push is "
            "one commit, so it landed whole or not at all."
            if writing
            else "Check the network (and HF_ENDPOINT) and run the same command again: "
            "downloads resume from the cache.",
            transient=True,
        ) from e


def _write_error(what: str, repo_id: str) -> HubError:
    if what.startswith("open a pull request"):
        fix = "Use a token with write access (`hf auth login`, HF_TOKEN); a read-only one "
        fix += "cannot open pull requests."
    else:
        fix = "Use a token with write access to that namespace (`hf auth login`, HF_TOKEN), "
        fix += "push to a repo of your own with --push-to YOUR_NAME/REPO, or open a pull "
        fix += "request with --pr."
    return HubError(f"cannot {what}: this token may not write to {repo_id}.", fix)
