"""The repair pipeline: stage 1 (projection) and stage 2 (restoration with rollback) on one
PeftModel, whose adapter, disabled, is the aligned model.

The stages' decisions are the pure tensor functions of :mod:`adapter_repair.stages`; this module
computes what they need (directions, gradients), applies their choices to the live adapter
factors, measures the stop rule and the task guard, and returns the repaired adapter with every
step's record. It never writes files: :func:`adapter_repair.report.write_repair` does.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapter_repair import prompts as P
from adapter_repair.adapter import LoraAdapter
from adapter_repair.config import (
    SEARCH_SPACE,
    EvalConfig,
    GenerationConfig,
    LoadConfig,
    RepairConfig,
    RestoreConfig,
)
from adapter_repair.directions import difference_directions, mean_hidden, shift_directions, unit
from adapter_repair.errors import AdapterFormatError, NothingToRepair
from adapter_repair.generation import generate
from adapter_repair.judges import Judge
from adapter_repair.measures import Rate, fidelity, task_matches, use_adapter
from adapter_repair.restore import (
    Targets,
    answer_batches,
    answer_gradients,
    direction_cosine,
    direction_gradients,
    factor_params,
    prompt_batches,
    prompt_targets,
)
from adapter_repair.stages import (
    BENIGN_SCORES,
    choose_restored,
    orthonormal_basis,
    project_read,
    project_write,
    rollback_mask,
)
from adapter_repair.walk import ModelMap, norm_gain, walk

logger = logging.getLogger(__name__)

ADAPTER = "default"  #: the adapter being repaired, as PeftModel names it
REFERENCE = "reference"  #: the fine-tuned adapter as it came in (the fidelity guard only)


@dataclass
class Guard:
    """What the task guard compares: task rows (prompt, answer) scored by a match rule, or,
    without task data, benign prompts and fidelity to the fine-tuned adapter."""

    task: P.PromptSet | None
    benign: P.PromptSet
    match: str = "contains"

    @property
    def kind(self) -> str:
        return "task" if self.task is not None else "fidelity"

    def prompts(self) -> tuple[str, ...]:
        return self.task.prompts if self.task is not None else self.benign.prompts

    def halves(self, fit_rows: int = 0) -> tuple[Guard, Guard]:
        """(fit, check): every other row for the benign loss, the rest for the guard; with
        ``fit_rows``, only the first ``fit_rows`` of the even rows fit and every other row
        checks (a bigger check set, the same cost per step)."""
        n = len(self.prompts())
        fit_idx = list(range(0, n, 2))
        if fit_rows:
            fit_idx = fit_idx[:fit_rows]
        chosen = set(fit_idx)
        check_idx = [i for i in range(n) if i not in chosen]

        def part(idx: list[int], label: str, start: int) -> Guard:
            if self.task is None:
                return Guard(None, self.benign.subset(idx, label), self.match)
            return Guard(self.task.subset(idx, label), self.benign.every(2, start), self.match)

        return part(fit_idx, "fit", 0), part(check_idx, "check", 1)


@dataclass
class Step:
    """One restoration step (or the start, step 0)."""

    step: int
    restored: int = 0  #: coordinates set to 0 this step
    rolled_back: int = 0  #: of those, returned to their reference value
    changed: float = 0.0  #: share of all adapter coordinates that differ from the input
    cosine: float | None = None  #: mean cos(mean h_L, h*) on the probe batches
    probe_harmful: float | None = None  #: measured every eval_every steps
    guard: float | None = None  #: task score, or KL to the fine-tuned adapter
    guard_ok: bool | None = None
    rate: float = 0.0  #: the share of coordinates this step restored at most
    backtracked: bool = False  #: the guard failed here and the state went back
    seconds: float = 0.0


@dataclass
class RepairResult:
    """The repaired adapter and how it got there."""

    adapter: LoraAdapter
    history: list[Step]
    stopped: str  #: why stage 2 ended (or "projection only")
    settings: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    kept_step: int | None = None  #: the step whose state was kept
    target: float | None = None  #: the probe harmful rate stage 2 aimed for
    guard_reference: float | None = None  #: the fine-tuned adapter's guard value
    changed: float = 0.0  #: share of adapter coordinates that differ from the input
    #: with ``keep_checkpoints``: the adapter at each measured step whose guard held
    checkpoints: dict[int, LoraAdapter] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stopped": self.stopped,
            "kept_step": self.kept_step,
            "target": self.target,
            "guard_reference": self.guard_reference,
            "changed": self.changed,
            "seconds": self.seconds,
            "settings": self.settings,
            "history": [dataclasses.asdict(s) for s in self.history],
        }


# -- helpers over the live adapter ----------------------------------------------------------
def _factors(model_map: ModelMap) -> dict[str, torch.nn.Parameter]:
    return factor_params(model_map, model_map.n_layers, ADAPTER)


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def _load_state(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def _changed_share(
    params: dict[str, torch.nn.Parameter], reference: dict[str, torch.Tensor]
) -> float:
    diff = sum(int((p.detach() != reference[n]).sum()) for n, p in params.items())
    total = sum(p.numel() for p in params.values())
    return diff / total if total else 0.0


def _to_adapter(
    adapter: LoraAdapter, params: dict[str, torch.nn.Parameter], model_map: ModelMap
) -> LoraAdapter:
    """A copy of ``adapter`` holding the live factors, in the adapter file's dtypes."""
    out = adapter.clone()
    for m in out:
        a = params.get(f"{m.key}.lora_A")
        b = params.get(f"{m.key}.lora_B")
        if a is None or b is None:
            continue
        m.A = a.detach().to(device="cpu", dtype=m.A.dtype).clone()
        m.B = b.detach().to(device="cpu", dtype=m.B.dtype).clone()
    return model_map.annotate(out)


def resolve_layer(layer: int, n_layers: int) -> int:
    """L from the config's value, an index into ``hidden_states`` (n_layers + 1 entries), so
    negative counts from the end as in Python: -1 is n_layers (the final normed hidden state,
    every layer restorable), -2 is n_layers - 1. Checked: 1 <= L <= n_layers."""
    resolved = layer + n_layers + 1 if layer < 0 else layer
    if not 1 <= resolved <= n_layers:
        raise ValueError(
            f"layer {layer} resolves to {resolved}; it must satisfy 1 <= L <= n_layers = {n_layers}"
        )
    return resolved


# -- measuring inside the loop --------------------------------------------------------------
def probe_harmful_rate(
    model: Any, tokenizer: Any, prompts: Sequence[str], judge: Judge, gen: GenerationConfig
) -> Rate:
    answers = generate(model, tokenizer, prompts, gen, desc="probe")
    return Rate.of(judge.harmful(prompts, answers))


def guard_value(model: Any, tokenizer: Any, guard: Guard, gen: GenerationConfig) -> float:
    """Task score (higher is better) or KL to the fine-tuned adapter (lower is better)."""
    if guard.task is not None:
        answers = generate(model, tokenizer, guard.task.prompts, gen, desc="guard")
        return Rate.of(task_matches(answers, guard.task.answers or (), guard.match)).rate
    fid = fidelity(
        model, tokenizer, guard.benign.prompts, reference=REFERENCE, candidate=ADAPTER, config=gen
    )
    return fid.kl


def guard_answers(model: Any, tokenizer: Any, guard: Guard, gen: GenerationConfig) -> list[Any]:
    """The answers the guard's loss protects, as batches: the task rows' answers, or the model's
    own greedy answers to the benign prompts (call it with the fine-tuned adapter on); an answer
    that ran to the token limit stays open (no end token is added)."""
    if guard.task is not None and guard.task.answers:
        pairs = list(zip(guard.task.prompts, guard.task.answers, strict=True))
        ended = None
    else:
        prompts = guard.benign.prompts
        texts = generate(model, tokenizer, prompts, gen, desc="guard answers")
        pairs = list(zip(prompts, texts, strict=True))
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        ended = [n < gen.max_new_tokens for n in lengths]
    return answer_batches(tokenizer, pairs, gen.batch_size, gen.max_new_tokens, ended)


def guard_holds(value: float, reference: float, guard: Guard, config: RepairConfig) -> bool:
    if guard.kind == "task":
        return value >= reference * (1.0 - config.restore.max_drop) - 1e-12
    return value <= config.restore.max_kl


# -- stage 1 --------------------------------------------------------------------------------
def projection_directions(
    model: Any,
    tokenizer: Any,
    probe: Sequence[str],
    benign: Sequence[str],
    layers: Sequence[int],
    kind: str,
    batch_size: int,
) -> dict[int, torch.Tensor | None]:
    """Per ``hidden_states`` index, the unit direction stage 1 projects off (None: nothing)."""
    with use_adapter(model, None):
        aligned_probe = mean_hidden(model, tokenizer, probe, layers, batch_size=batch_size)
        aligned_benign = mean_hidden(model, tokenizer, benign, layers, batch_size=batch_size)
    if kind == "refusal":
        return difference_directions(aligned_probe, aligned_benign)
    with use_adapter(model, ADAPTER):
        tuned_probe = mean_hidden(model, tokenizer, probe, layers, batch_size=batch_size)
        tuned_benign = mean_hidden(model, tokenizer, benign, layers, batch_size=batch_size)
    return shift_directions(tuned_probe, aligned_probe, tuned_benign, aligned_benign)


def project_adapter(
    model_map: ModelMap,
    directions: dict[int, torch.Tensor | None],
    sides: str,
    strength: float,
) -> int:
    """Apply stage 1 to the live factors: writers (layer l) lose ``directions[l+1]`` from B,
    readers lose unit(g * directions[l]) from A (g the input norm's gain; a post-norm writer's
    direction likewise passes through its norm's gain). Returns how many matrices changed."""
    changed = 0
    with torch.no_grad():
        for site in model_map:
            if site.layer is None:
                continue
            module: Any = site.module
            if site.writes and sides in ("write", "both"):
                r = directions.get(site.layer + 1)
                if r is not None and site.out_norm is not None:
                    r = unit(norm_gain(site.out_norm).float().cpu() * r)
                if r is not None:
                    B = module.lora_B[ADAPTER].weight  # (d_out, r)
                    U = orthonormal_basis([r]).to(B.device)  # (d_out, 1)
                    B.copy_(project_write(B.float(), U.float(), strength).to(B.dtype))
                    changed += 1
            if site.reads and sides in ("read", "both"):
                r = directions.get(site.layer)
                if r is not None and site.in_norm is not None:
                    r = unit(norm_gain(site.in_norm).float().cpu() * r)
                if r is not None:
                    A = module.lora_A[ADAPTER].weight  # (r, d_in)
                    U = orthonormal_basis([r]).to(A.device)  # (d_in, 1)
                    A.copy_(project_read(A.float(), U.float(), strength).to(A.dtype))
                    changed += 1
    return changed


# -- stage 2 --------------------------------------------------------------------------------
def _add_reference(model: Any) -> None:
    """Load a copy of the adapter as it came in under the name "reference", for the fidelity
    guard (PEFT keeps the active adapter "default")."""
    model.add_adapter(REFERENCE, model.peft_config[ADAPTER])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{REFERENCE}." in name:
                src = dict(model.named_parameters())[name.replace(f".{REFERENCE}.", f".{ADAPTER}.")]
                p.copy_(src)
                p.requires_grad_(False)
    model.set_adapter(ADAPTER)


Target = tuple[list[Any], Targets]  #: prompt batches and what their h_L is pulled toward


def _restore_step(
    model: Any,
    model_map: ModelMap,
    below: dict[str, torch.nn.Parameter],
    reference: dict[str, torch.Tensor],
    harmful: Target,
    benign_gradients: Callable[[], dict[str, torch.Tensor]],
    L: int,
    config: RepairConfig,
    step: int,
    rate: float,
) -> Step | None:
    """Stage 2, steps 1-5, once: gradients toward h*, the benign gradient where the score or
    the rollback needs it, zero the chosen coordinates, roll back the share the benign gradient
    wants back. None when there is no candidate left."""
    rc = config.restore
    layers = model_map.layers
    _, g = direction_gradients(model, harmful[0], L, harmful[1], below, layers=layers)
    g_b = None
    if rc.score in BENIGN_SCORES:
        g_b = benign_gradients()
    values = {n: p.detach().float().cpu() for n, p in below.items()}
    chosen = choose_restored(
        values, g, rate, rule=rc.score, benign_grads=g_b, per_matrix=rc.per_matrix
    )
    n_chosen = sum(int(m.sum()) for m in chosen.values())
    if n_chosen == 0:
        return None
    with torch.no_grad():
        for n, p in below.items():
            p[chosen[n].to(p.device)] = 0
    rolled = 0
    if rc.rollback > 0:
        g_after = benign_gradients()
        ref_cpu = {n: t.float().cpu() for n, t in reference.items()}
        back = rollback_mask(chosen, ref_cpu, g_after, rc.rollback)
        with torch.no_grad():
            for n, p in below.items():
                m = back[n].to(p.device)
                p[m] = reference[n][m]
        rolled = sum(int(m.sum()) for m in back.values())
    return Step(step, restored=n_chosen, rolled_back=rolled, rate=rate)


# -- the pipeline ---------------------------------------------------------------------------
def search_settings(rc: RestoreConfig, n: int) -> list[RestoreConfig]:
    """The first ``n`` stage-2 settings a per-adapter search tries: ``rc`` itself, then each
    lever of SEARCH_SPACE moved alone to each of its other values, then the remaining
    combinations, so a small budget covers every lever once before mixing them."""
    base = {k: getattr(rc, k) for k in SEARCH_SPACE}
    seen = [base]
    for lever, values in SEARCH_SPACE.items():
        seen += [{**base, lever: v} for v in values if v != base[lever]]
    for combo in itertools.product(*SEARCH_SPACE.values()):
        seen.append(dict(zip(SEARCH_SPACE, combo, strict=True)))
    unique: list[dict[str, Any]] = []
    for s in seen:
        if s not in unique:
            unique.append(s)
    return [dataclasses.replace(rc, **s, search=0) for s in unique[: max(1, n)]]


def kept_record(result: RepairResult) -> Step:
    """The history entry of the step a run kept (its last measurement of that state)."""
    measured = [
        s
        for s in result.history
        if s.step == (result.kept_step or 0) and not s.backtracked and s.probe_harmful is not None
    ]
    return measured[-1] if measured else result.history[0]


def repair(
    model: Any,
    tokenizer: Any,
    adapter: LoraAdapter,
    config: RepairConfig,
    *,
    probe: P.PromptSet,
    guard: Guard,
    judge: Judge,
    generation: GenerationConfig | None = None,
    keep_checkpoints: bool = False,
) -> RepairResult:
    """Repair ``adapter``, attached to ``model`` (a PeftModel, adapter name "default", factors
    trainable) as the fine-tuned model; the same model with the adapter disabled is the aligned
    one. The live factors are changed in place; the result holds a copy as a LoraAdapter.

    ``probe``: harmful prompts the repair may use (directions, gradients, stop rule).
    ``guard``: task rows or benign prompts that protect what the fine-tune learnt.
    ``keep_checkpoints``: also return the adapter at every measured step that held (one copy
    each), so a benchmark can score the whole path, not only where the stop rule ended.

    With ``config.restore.search`` > 1, stage 2 runs once per setting of
    :func:`search_settings`, each from the input adapter, and the best run by
    :func:`search_rank` is kept (lowest probe harmful rate at its kept step down to the
    target, then the best guard, then the fewest coordinates changed): the settings that suit one adapter do not suit every adapter (DESIGN's lesson
    4), and the probe and guard that steer one run can choose between runs. Every trial is
    recorded in ``settings["search"]``.
    """

    def once(cfg: RepairConfig) -> RepairResult:
        return _repair_once(
            model, tokenizer, adapter, cfg, probe=probe, guard=guard, judge=judge,
            generation=generation, keep_checkpoints=keep_checkpoints,
        )  # fmt: skip

    if config.restore.search <= 1 or config.method == "project":
        return once(config)
    params = _factors(walk(model))
    original = _snapshot(params)
    trials: list[dict[str, Any]] = []
    best: tuple[tuple[float, float, float], int, RepairResult] | None = None
    settings = search_settings(config.restore, config.restore.search)
    for i, rc in enumerate(settings):
        _load_state(params, original)
        logger.info(
            "search %d/%d: score %s, rollback %g, rate %g", i + 1, len(settings), rc.score,
            rc.rollback, rc.rate,
        )  # fmt: skip
        result = once(dataclasses.replace(config, restore=rc))
        rec = kept_record(result)
        trials.append(
            {
                **{k: getattr(rc, k) for k in SEARCH_SPACE},
                "probe_harmful": rec.probe_harmful,
                "guard": rec.guard,
                "changed": result.changed,
                "stopped": result.stopped,
                "kept_step": result.kept_step,
                "seconds": result.seconds.get("total", 0.0),
            }
        )
        key = search_rank(trials[-1], result.target, guard.kind)
        if best is None or key < best[0]:
            best = (key, i, result)  # its adapter holds its state: one copy, not one per trial
        if result.stopped == "already at target":
            break  # nothing searched changes that: every trial would stop the same way
    assert best is not None
    _, chosen, result = best
    for m in result.adapter:  # the live model back to the chosen run's factors
        for side, t in (("lora_A", m.A), ("lora_B", m.B)):
            p = params.get(f"{m.key}.{side}")
            if p is not None:
                with torch.no_grad():
                    p.copy_(t.to(device=p.device, dtype=p.dtype))
    result.settings["search"] = {"n": config.restore.search, "trials": trials, "chosen": chosen}
    result.seconds["search"] = sum(t["seconds"] for t in trials)
    result.seconds["total"] = result.seconds["search"]
    logger.info(
        "search chose trial %d: score %s, rollback %g, rate %g (probe harmful %.1f%%)",
        chosen + 1, trials[chosen]["score"], trials[chosen]["rollback"], trials[chosen]["rate"],
        100 * (trials[chosen]["probe_harmful"] or 0.0),
    )  # fmt: skip
    return result


def search_rank(
    trial: dict[str, Any], target: float | None, guard_kind: str
) -> tuple[float, float, float]:
    """Sort key of a search trial, smaller is better: probe harmful rate at its kept step
    (anything at or under the target counts as the target: below it, the probe that steered
    the run should not also pick the run), then the guard (task score: higher is better; KL:
    lower is better), then the share of coordinates changed."""
    probe = trial["probe_harmful"] or 0.0
    harm = max(probe, target or 0.0)
    g = trial["guard"] or 0.0
    return (harm, g if guard_kind == "fidelity" else -g, trial["changed"])


def _repair_once(
    model: Any,
    tokenizer: Any,
    adapter: LoraAdapter,
    config: RepairConfig,
    *,
    probe: P.PromptSet,
    guard: Guard,
    judge: Judge,
    generation: GenerationConfig | None = None,
    keep_checkpoints: bool = False,
) -> RepairResult:
    """One run of :func:`repair` with ``config``'s settings as they are (no search)."""
    t_start = time.perf_counter()
    rc = config.restore
    gen = generation or GenerationConfig(config.max_new_tokens, config.batch_size, progress=False)
    model_map = walk(model)
    model_map.annotate(adapter)
    n_layers = model_map.n_layers
    probe_prompts = list(probe.take(config.probe_prompts).prompts)
    guard = dataclasses.replace(
        guard,
        task=guard.task.take(config.guard_prompts) if guard.task is not None else None,
        benign=guard.benign.take(config.guard_prompts),
    )
    fit = guard  # the rows the benign loss is fit on; ``guard`` checks
    if rc.hold_out and len(guard.prompts()) >= 2:
        fit, guard = guard.halves(rc.fit_rows)
    guard_prompts = list(fit.prompts())
    params = _factors(model_map)
    original = _snapshot(params)
    settings = {"repair": dataclasses.asdict(config), "n_layers": n_layers, "guard": guard.kind}
    seconds: dict[str, float] = {}
    model.eval()  # no LoRA dropout in gradients or answers
    guard_ref_value = 0.0
    if config.method != "project":
        if guard.kind == "fidelity":
            _add_reference(model)
        else:  # the fine-tuned adapter's own task score, before any change
            guard_ref_value = guard_value(model, tokenizer, guard, gen)

    if config.method in ("project", "both"):
        t0 = time.perf_counter()
        layers = list(range(n_layers + 1))
        directions = projection_directions(
            model,
            tokenizer,
            probe_prompts,
            guard_prompts,
            layers,
            config.project.direction,
            config.batch_size,
        )
        n = project_adapter(model_map, directions, config.project.sides, config.project.strength)
        seconds["project"] = time.perf_counter() - t0
        logger.info(
            "stage 1: projected %d factor matrices off the %s direction in %.1f s",
            n,
            config.project.direction,
            seconds["project"],
        )
    if config.method == "project":
        seconds["total"] = time.perf_counter() - t_start
        changed = _changed_share(params, original)
        return RepairResult(
            _to_adapter(adapter, params, model_map),
            [Step(0, changed=changed)],
            "projection only",
            settings,
            seconds,
            changed=changed,
        )

    t0 = time.perf_counter()
    L = resolve_layer(rc.layer, n_layers)
    settings["L"] = L
    below = factor_params(model_map, L, ADAPTER)
    if not below:
        raise ValueError(f"the adapter has no LoRA module below layer {L}; nothing to restore")
    probe_batches = prompt_batches(tokenizer, probe_prompts, config.batch_size)
    guard_batches = prompt_batches(tokenizer, guard_prompts, config.batch_size)

    def states(batches: list[Any], prompts: list[str]) -> Targets:
        """h_L as the model stands: each prompt's own (targets=prompt) or their mean."""
        if rc.targets == "prompt":
            return prompt_targets(model, batches, L, layers=model_map.layers)
        return mean_hidden(model, tokenizer, prompts, [L], batch_size=config.batch_size)[L]

    with use_adapter(model, None):  # each harmful prompt toward the aligned model's states
        h_star = states(probe_batches, probe_prompts)
        aligned_rate = probe_harmful_rate(model, tokenizer, probe_prompts, judge, gen)
    answers: list[Any] | None = None
    b_star: Targets | None = None
    with use_adapter(model, ADAPTER):  # the guard's answers, or states, as fine-tuned
        if rc.benign_loss == "answers":
            answers = guard_answers(model, tokenizer, fit, gen)
        else:
            b_star = states(guard_batches, guard_prompts)

    def benign_gradients() -> dict[str, torch.Tensor]:
        if answers is not None:
            return answer_gradients(model, answers, below)[1]
        assert b_star is not None
        layers = model_map.layers
        return direction_gradients(model, guard_batches, L, b_star, below, layers=layers)[1]

    target = rc.target if rc.target is not None else aligned_rate.rate
    reference = _snapshot(below)  # rollback returns coordinates to the state entering stage 2
    start = Step(
        0,
        changed=_changed_share(params, original),
        cosine=direction_cosine(model, probe_batches, L, h_star, layers=model_map.layers),
        probe_harmful=probe_harmful_rate(model, tokenizer, probe_prompts, judge, gen).rate,
        guard=guard_value(model, tokenizer, guard, gen),
    )
    start.guard_ok = guard_holds(start.guard or 0.0, guard_ref_value, guard, config)
    start.seconds = time.perf_counter() - t0
    history = [start]
    logger.info(
        "stage 2 at L=%d: aligned probe harmful rate %.1f%% (target %.1f%%), adapter %.1f%%, "
        "guard (%s) %.3f",
        L,
        100 * aligned_rate.rate,
        100 * target,
        100 * (start.probe_harmful or 0.0),
        guard.kind,
        start.guard or 0.0,
    )
    kept_state, kept_step, stopped = _snapshot(params), 0, "max_steps"
    checkpoints: dict[int, LoraAdapter] = {}
    rate, backtracks = rc.rate, 0
    if (start.probe_harmful or 0.0) <= target:
        stopped = "already at target"
    else:
        for step in range(1, rc.max_steps + 1):
            t_step = time.perf_counter()
            rec = _restore_step(
                model,
                model_map,
                below,
                reference,
                (probe_batches, h_star),
                benign_gradients,
                L,
                config,
                step,
                rate,
            )
            if rec is None:
                stopped = "no candidates"
                break
            rec.changed = _changed_share(params, original)
            rec.cosine = direction_cosine(model, probe_batches, L, h_star, layers=model_map.layers)
            measure = step % rc.eval_every == 0 or step == rc.max_steps
            if measure:
                measured = probe_harmful_rate(model, tokenizer, probe_prompts, judge, gen)
                rec.probe_harmful = measured.rate
                rec.guard = guard_value(model, tokenizer, guard, gen)
                rec.guard_ok = guard_holds(rec.guard, guard_ref_value, guard, config)
            rec.seconds = time.perf_counter() - t_step
            history.append(rec)
            logger.info(
                "step %d: restored %d, rolled back %d, changed %.2f%%, cos %.4f%s",
                step,
                rec.restored,
                rec.rolled_back,
                100 * rec.changed,
                rec.cosine,
                ""
                if not measure
                else f", probe harmful {100 * (rec.probe_harmful or 0):.1f}%, guard {rec.guard:.3f}"
                f" ({'holds' if rec.guard_ok else 'fails'})",
            )
            if measure:
                if not rec.guard_ok and backtracks < rc.backtrack:
                    # Back to the last state that held, with smaller steps from there.
                    backtracks += 1
                    rate /= 2
                    rec.backtracked = True
                    _load_state(params, kept_state)
                    logger.info(
                        "guard failed: back to step %d, rate halved to %.4g (%d/%d)",
                        kept_step,
                        rate,
                        backtracks,
                        rc.backtrack,
                    )
                    continue
                if not rec.guard_ok:
                    stopped = "guard"
                    break
                kept_state, kept_step = _snapshot(params), step
                if keep_checkpoints:
                    checkpoints[step] = _to_adapter(adapter, params, model_map)
                if (rec.probe_harmful or 0.0) <= target:
                    stopped = "target"
                    break
        _load_state(params, kept_state)
    seconds["restore"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    changed = _changed_share(params, original)
    if guard.kind == "fidelity":
        model.delete_adapter(REFERENCE)
    logger.info(
        "stage 2 stopped (%s); kept step %d; %.2f%% of coordinates changed; %.1f s",
        stopped,
        kept_step,
        100 * changed,
        seconds["restore"],
    )
    return RepairResult(
        _to_adapter(adapter, params, model_map),
        history,
        stopped,
        settings,
        seconds,
        kept_step=kept_step,
        target=target,
        guard_reference=guard_ref_value,
        changed=changed,
        checkpoints=checkpoints,
    )


# -- folder in, folder out --------------------------------------------------------------------
@dataclass
class RepairOutcome:
    """What :func:`repair_folder` did: the result, the report written beside the adapter, and
    where."""

    result: RepairResult
    report: dict[str, Any]
    out: Path


def repair_folder(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    load: LoadConfig | None = None,
    config: RepairConfig | None = None,
    evaluation: EvalConfig | None = None,
    generation: GenerationConfig | None = None,
    task: P.PromptSet | None = None,
    guard_task: P.PromptSet | None = None,
    measure: bool = True,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    also: Callable[[Path, Mapping[str, Any]], object] | None = None,
    source_label: str | None = None,
    base_label: str | None = None,
    min_harmful: float | None = None,
) -> RepairOutcome:
    """Repair the adapter folder ``source`` into a new folder ``out`` (same format and rank,
    with ``repair_report.{json,md,png}``), measuring the aligned base, the fine-tuned and the
    repaired adapter before and after unless ``measure`` is False. ``source`` is only read.

    ``source_label`` and ``base_label`` name the source and the base in the report (default:
    their paths; a Hub repo's ``owner/name@sha`` rather than its cache folder).
    ``min_harmful``: after measuring the fine-tuned adapter, raise :class:`NothingToRepair`
    when its harmful rate is under this (needs ``measure``). ``provenance`` (where source and base came from: repo ids and commit shas) goes into the
    report as given; ``also(folder, report)`` writes more files (a model card) into the output
    before it appears, so that the adapter, its report and those files land together or not
    at all.

    ``task``: the user's task rows (prompt, answer); they guard the task during the repair and
    are scored before and after (``guard_task``, when given, guards instead, so that the rows
    scored are held out from the repair). Without task rows the guard is fidelity to the
    fine-tuned adapter on the shipped benign prompts.
    """
    from adapter_repair import __version__
    from adapter_repair.adapter import _same_path, check_output_folder, save_adapter
    from adapter_repair.evaluate import EvalSets, evaluate_model
    from adapter_repair.judges import load_judge, load_refusal_list
    from adapter_repair.loading import load_model, load_tokenizer
    from adapter_repair.report import write_report

    load = load or LoadConfig()
    config = config or RepairConfig()
    evaluation = evaluation or EvalConfig()
    out_path = Path(out)
    check_output_folder(out_path, overwrite)
    if out_path.exists() and _same_path(out_path, Path(source)):
        raise AdapterFormatError(
            f"refusing to write over the input adapter {source}.",
            "Choose a different --out folder; the input is never modified.",
        )
    gen = generation or GenerationConfig(config.max_new_tokens, config.batch_size)
    judge = load_judge(evaluation.judge)
    refusals = load_refusal_list(evaluation.refusal_list)
    model, adapter = load_model(source, load)
    tokenizer = load_tokenizer(source, load.base or adapter.base_model_name_or_path)
    sets = EvalSets(P.harmful("eval"), P.xstest("safe"), task).limited(evaluation.limit)
    warnings = []
    if adapter.extra_tensors:
        warnings.append(
            f"the adapter carries {len(adapter.extra_tensors)} modules_to_save tensor(s); they "
            "are copied unchanged and may still carry the fine-tune's behaviour."
        )
        logger.warning(warnings[-1])

    def measure_now(label: str) -> dict[str, Any]:
        report = evaluate_model(
            model,
            tokenizer,
            sets,
            generation=gen,
            judge=judge,
            refusals=refusals,
            match=evaluation.match,
            label=label,
        )
        return {k: v.as_dict() for k, v in report.measures.items()}

    t0 = time.perf_counter()
    measures: dict[str, Any] = {}
    if measure:
        logger.info("measuring the aligned base (adapter disabled)")
        with use_adapter(model, None):
            measures["aligned"] = measure_now("aligned")
        logger.info("measuring the fine-tuned adapter")
        measures["before"] = measure_now("fine-tuned")
        harmful = measures["before"]["harmful_rate"]["rate"]
        if min_harmful is not None and harmful < min_harmful:
            raise NothingToRepair(harmful, min_harmful)
    logger.info("repairing (method %s)", config.method)
    measure_seconds = time.perf_counter() - t0
    result = repair(
        model,
        tokenizer,
        adapter,
        config,
        probe=P.harmful("probe"),
        guard=Guard(guard_task or task, P.benign("benign"), evaluation.match),
        judge=judge,
        generation=dataclasses.replace(gen, progress=False),
    )
    t0 = time.perf_counter()
    if measure:
        logger.info("measuring the repaired adapter")
        measures["after"] = measure_now("repaired")
    measure_seconds += time.perf_counter() - t0
    report: dict[str, Any] = {
        "tool_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source_label or str(source),
        "base": base_label or load.base or adapter.base_model_name_or_path,
        "quant": load.resolved_quant(),
        "method": config.method,
        "measures": measures,
        "measure_seconds": measure_seconds,
        "sets": sets.record(),
        "splits": P.split_record(),
        "judge": judge.name,
        "generation": dataclasses.asdict(gen),
        "repair": result.as_dict(),
        "warnings": warnings,
    }
    if provenance:
        report["provenance"] = dict(provenance)

    def write_extra(folder: Path) -> None:
        write_report(folder, report)
        if also is not None:
            also(folder, report)

    path = save_adapter(result.adapter, out_path, overwrite=overwrite, also=write_extra)
    return RepairOutcome(result, report, path)
