"""One progress bar for a repair run, on stderr: the phase as it starts (measuring,
repairing), then the stage-2 steps with the probe harmful rate and the guard in its postfix.

Off with ``-q`` and when stderr is not a terminal (tqdm's own check), so logs and CI output
stay clean. The library only calls back (``on_phase``, ``on_step``); this draws."""

from __future__ import annotations

import logging
import shutil
from types import TracebackType
from typing import Any

import click
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class RunProgress:
    """Context manager whose :meth:`phase` and :meth:`step` are the repair's callbacks."""

    def __init__(self, ctx: click.Context, config: Any) -> None:
        obj = ctx.find_root().obj or {}
        self.disable: bool | None = True if obj.get("quiet", 0) > 0 else None
        self.max_steps = int(config.restore.max_steps)
        self.bar: Any = None
        self._redirect: Any = None

    def __enter__(self) -> RunProgress:
        # the one bar (none with -q): transformers' and the Hub client's own bars (loading
        # weights, downloads) are off, and log lines are written above the bar, not through it
        from transformers.utils import logging as hf_logging

        from adapter_repair.hub.pull import quiet_downloads

        hf_logging.disable_progress_bar()  # with -q too: no bar at all
        quiet_downloads()
        self._redirect = logging_redirect_tqdm([logging.getLogger("adapter_repair")])
        self._redirect.__enter__()
        # total = the steps; phases before stage 2 show in the description at step 0
        size = shutil.get_terminal_size((100, 20))
        self.bar = tqdm(
            total=self.max_steps,
            desc="starting",
            unit="step",
            disable=self.disable,
            leave=True,
            # a terminal that reports no size (a fresh pty) gets the fallback: tqdm hides a
            # bar below a screen 0 rows high
            ncols=size.columns or 100,
            nrows=size.lines or 20,
        )
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.__exit__(_type, _value, _tb)

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(name)

    def step(self, rec: Any) -> None:
        """A stage-2 history entry: the bar moves to its step, the postfix shows its measures."""
        if self.bar is None:
            return
        post: dict[str, str] = {}
        if rec.probe_harmful is not None:
            post["probe harm"] = f"{100 * rec.probe_harmful:.1f}%"
        if rec.guard is not None:
            post["guard"] = f"{rec.guard:.3f}" + ("" if rec.guard_ok is not False else " FAILS")
        if rec.backtracked:
            post["backtracked"] = "yes"
        self.bar.set_description_str(f"stage 2 step {rec.step}/{self.max_steps}")
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(max(0, rec.step - self.bar.n))
