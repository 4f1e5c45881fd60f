"""Whether and where ``fix`` pushes the repaired adapter."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_repair.settings import setting

#: the prefix that makes ``fix --task`` a Hub dataset (hub:owner/name) rather than a file
HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class PushConfig:
    """Whether and where ``fix`` pushes the repaired adapter (nothing is pushed by default)."""

    push_to: str | None = setting(
        None,
        "Push the repaired adapter to this Hub repo (created when missing) as one commit.",
        metavar="OWNER/NAME",
    )
    pr: bool = setting(
        False, "Open a pull request with the repaired adapter on the SOURCE repo (Hub SOURCE only)."
    )
    dry_run: bool = setting(
        False, "Repair, then list what --push-to or --pr would push, without pushing."
    )
    private: bool = setting(False, "Create the --push-to repo private.")
    push_unrepaired: bool = setting(
        False,
        "Push (--push-to, --pr) even when the repair did not reach its target. Default: such a "
        "repair writes the adapter and its report locally and pushes nothing.",
    )

    def __post_init__(self) -> None:
        if self.pr and self.push_to:
            raise ValueError(
                "--pr and --push-to both given: choose one (--pr opens a pull request on the "
                "source repo, --push-to writes a repo)."
            )
        if self.dry_run and not (self.pr or self.push_to):
            raise ValueError(
                "--dry-run shows what a push would send, but nothing is to be pushed: add "
                "--push-to owner/name or --pr, or leave --dry-run out."
            )

    @property
    def pushing(self) -> bool:
        return bool(self.pr or self.push_to)
