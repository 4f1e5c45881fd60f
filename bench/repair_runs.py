"""What bench/repair.py measures, and nothing else: the settings of every method, the cache
key of every row (a digest of this file, bench/baselines.py and the package's measuring code;
the settings; the judge; the prompt sets) and the runs that build the rows (a repair and its
merged-bf16 measures, the 4-bit measures, the reference rows). The tables that read these
rows live in bench/repair_tables.py, outside the digest: a change to how a table is
written keeps every row; a change here reruns them all.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import resource
import time
from pathlib import Path
from typing import Any

from repair_settings import PUBLISHED, VARIANTS

from adapter_repair.beds.artifacts import Artifact
from adapter_repair.beds.small import SmallWorld
from adapter_repair.repair.config import RepairConfig

HERE = Path(__file__).resolve().parent
N_LAYERS = 30  #: SmolLM2-135M
SAFE_LORA_SHARE = 1.0  #: share of modules the Safe LoRA-style baseline projects (safelora)


def safe_lora_share(method: str) -> float | None:
    """The share of modules a Safe LoRA-style method projects: ``safelora`` all of them,
    ``safelora-0.25`` the quarter least like their projection (the sweep that sets it beside
    ours at equal task score); None for any other method."""
    if method == "safelora":
        return SAFE_LORA_SHARE
    if method.startswith("safelora-"):
        share = float(method.removeprefix("safelora-"))
        if not 0.0 < share <= 1.0:
            raise ValueError(f"{method}: the share must be in (0, 1]")
        return share
    return None


#: the dense reference's settings (the published ones; L as ours)
DENSE = {"layer": N_LAYERS, "rate": 0.002, "steps": 20, "rollback": 0.2, "eval_every": 5}
GUARD_ROWS = RepairConfig().guard_prompts  #: the product default: half fit, half check


def guard_rows(method: str) -> int:
    """Task rows a method's guard gets: the product default (hold-out splits them into rows
    that fit the benign loss and rows that check the guard)."""
    return GUARD_ROWS


def repair_config(method: str) -> RepairConfig:
    """The settings a method runs: ours (project, restore, both) with the product's defaults
    (``fix`` with no option but the method), the published method and each ablation variant
    as restore with its levers moved. The guard gets :func:`guard_rows` task rows, split by
    hold_out into rows that fit the benign loss and rows that check the guard."""
    if method in VARIANTS:
        base, overrides = "restore", VARIANTS[method][1]
    elif method == "published":
        base, overrides = "restore", PUBLISHED
    else:
        base, overrides = method, {}
    return with_levers(RepairConfig(method=base, guard_prompts=guard_rows(method)), overrides)


def with_levers(config: RepairConfig, levers: dict[str, Any]) -> RepairConfig:
    """``config`` with ``levers`` moved: each a stage-2 setting (RestoreConfig) or one of the
    repair's own (RepairConfig: how many probe prompts fit and check)."""
    top = {k: v for k, v in levers.items() if k in RepairConfig.__dataclass_fields__}
    stage2 = {k: v for k, v in levers.items() if k not in top}
    return dataclasses.replace(config, restore=dataclasses.replace(config.restore, **stage2), **top)


def source_digest(paths: list[Path]) -> str:
    """sha256 over the files' paths and bytes, in path order: a changed line anywhere in the
    code that produced a row changes the row's cache key."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(str(path.relative_to(ROOT)).encode() + b"\x00" + path.read_bytes() + b"\x01")
    return h.hexdigest()


ROOT = HERE.parent
#: the package folders a measurement never runs: the CLI and the Hub client (the library never
#: imports them; tests/test_layering.py holds that rule), so work on them keeps the rows
NOT_MEASURING = ("cli", "hub")
#: the bench scripts whose code produces rows: this file (the small world's rows), the
#: comparison methods, the pico bench (its rows key on this digest too) and the results helper;
#: not the entry point (bench/repair.py: which rows, in what order), the rows' settings
#: (bench/repair_settings.py: each key holds them, resolved) nor the tables
#: (bench/repair_tables.py), which read rows and never make one
BENCH_CODE = ("repair_runs.py", "baselines.py", "pico_repair.py", "results_io.py")


#: package files that hold no measuring code: the repair's settings (their defaults, help
#: text and checks; every row's key holds the resolved settings in full, so a changed default
#: changes the key of exactly the rows that use it) and the report's rendering (files written
#: from numbers it does not compute)
NOT_MEASURING_FILES = ("repair/config.py", "repair/report.py")


def measuring_code() -> list[Path]:
    """The source files a row's measurement runs: the package but its CLI and Hub client,
    its repair settings and report rendering, and the repair benches."""
    package = ROOT / "adapter_repair"

    def measures(p: Path) -> bool:
        inside = p.relative_to(package)
        return inside.parts[0] not in NOT_MEASURING and inside.as_posix() not in NOT_MEASURING_FILES

    return [*filter(measures, package.rglob("*.py")), *(HERE / name for name in BENCH_CODE)]


#: what every row depends on beyond its settings: the code that measures it, the judge, the
#: prompt sets and their splits (the generation settings are in the code and the config)
MEASURED_BY = {"code": source_digest(measuring_code()), "judge": "substring"}
#: the parent run's code digest, handed to each ``--one`` child (which refuses another)
DIGEST_ENV = "ADAPTER_REPAIR_BENCH_DIGEST"


@functools.cache
def _prompt_digests() -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """The prompt sets' split digests, read once (the files do not change under a run)."""
    from adapter_repair.measure import prompts as P

    splits = P.split_record()
    return tuple(
        (name, tuple((s, rec["sha256"]) for s, rec in splits[name].items()))
        for name in ("harmful", "benign", "whole")
    )


def measured_by() -> dict[str, Any]:
    """MEASURED_BY with the prompt sets' digests (read when a key is first made, not at
    import)."""
    digests = {name: dict(splits) for name, splits in _prompt_digests()}
    return {**MEASURED_BY, "prompts": digests}


def config_key(config: RepairConfig) -> dict[str, Any]:
    """``config`` as a cache key: every setting, with what measured it (:func:`measured_by`)."""
    return {**dataclasses.asdict(config), "measured_by": measured_by()}


def artifact(world: SmallWorld, adapter: str, method: str) -> Artifact:
    payload: dict[str, Any] = {
        "adapter": world.artifacts[f"adapter-{adapter}"].key,
        "aligned": world.artifacts["aligned"].key,
        "measured_by": measured_by(),
    }
    share = safe_lora_share(method)
    if share is not None:
        payload.update(unaligned=world.artifacts["unaligned"].key, share=share)
    elif method == "dense":
        payload.update(dense=DENSE, guard_rows=GUARD_ROWS)
    elif method == "oneshot":
        from baselines import ONE_SHOT

        payload.update(oneshot=ONE_SHOT)
    elif method == "irr":
        from baselines import IRR

        payload.update(irr=IRR)
    else:
        payload.update(
            config=dataclasses.asdict(repair_config(method)), guard_rows=guard_rows(method)
        )
    return Artifact(f"repair-{adapter}-{method}", payload)


def reference_artifact(world: SmallWorld, adapter: str | None) -> Artifact:
    """The merged-bf16 measures of the aligned base (``adapter`` None) or of a zoo adapter as
    fine-tuned, taken by this code (the bed's own measures are keyed by recipe, not code)."""
    source = (
        {"aligned": world.artifacts["aligned"].key}
        if adapter is None
        else {"adapter": world.artifacts[f"adapter-{adapter}"].key}
    )
    return Artifact(f"ref-{adapter or 'aligned'}", {**source, "measured_by": measured_by()})


def run_reference(world: SmallWorld, adapter: str | None) -> None:
    """Measure a reference row merged in bf16, like the repaired rows (see reference_artifact)."""

    def make(out: Path) -> dict[str, Any]:
        model, tok = world.load_merged(adapter) if adapter else world.load_aligned()
        label = adapter or "aligned"
        return {"measures": measure_into(out, world, model, tok, label)}

    reference_artifact(world, adapter).build(world.root, make)


def measure_into(out: Path, world: SmallWorld, model: Any, tok: Any, label: str) -> dict[str, Any]:
    """The bed's measures of a loaded model: answers to ``out/measures.json``, rates returned."""
    report = world.measure(model, tok, label)
    (out / "measures.json").write_text(json.dumps(report.as_dict(), indent=2))
    return {k: v.as_dict() for k, v in report.measures.items()}


def run_dense(world: SmallWorld, adapter: str, out: Path) -> dict[str, Any]:
    """The dense reference: merge into float32 dense weights, restore single weights from the
    aligned model. Its output is a dense model, measured in place (bfloat16, like the zoo)."""
    import torch
    from baselines import dense_restore

    from adapter_repair.measure import prompts as P
    from adapter_repair.measure.config import GenerationConfig
    from adapter_repair.measure.generation import generate
    from adapter_repair.measure.judges import load_judge
    from adapter_repair.measure.measures import Rate
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.hidden import prompt_states
    from adapter_repair.model.loading import attach_adapter, load_base, load_tokenizer

    t0 = time.perf_counter()
    base = load_base(LoadConfig(base=str(world.aligned_dir), quant="none", dtype="float32"))
    tok = load_tokenizer(None, str(world.aligned_dir))
    aligned = {n: p.detach().clone() for n, p in base.named_parameters()}
    probe = list(P.harmful("probe").take(64).prompts)
    judge = load_judge("substring")
    L = int(DENSE["layer"])
    states = prompt_states(base, tok, probe, [L])[L]  # (n, d)
    gen = GenerationConfig(max_new_tokens=32, batch_size=64, progress=False)
    target = Rate.of(judge.harmful(probe, generate(base, tok, probe, gen))).rate
    model = attach_adapter(base, world.adapter_dir(adapter)).merge_and_unload()
    record = dense_restore(
        model,
        tok,
        aligned,
        probe,
        list(world.task_guard(GUARD_ROWS).prompts),
        judge,
        layer=L,
        rate=float(DENSE["rate"]),
        steps=int(DENSE["steps"]),
        rollback=float(DENSE["rollback"]),
        eval_every=int(DENSE["eval_every"]),
        aligned_probe_states=states,
        target_rate=target,
    )
    seconds = time.perf_counter() - t0
    rss = peak_rss_gb()
    del aligned
    return {
        "measures": measure_into(out, world, model.to(torch.bfloat16), tok, f"{adapter} dense"),
        "repair": {
            "changed": record["changed_decoder"],
            "stopped": "target" if len(record["history"]) < int(DENSE["steps"]) else "max_steps",
            "kept_step": len(record["history"]),
            "history": record["history"],
            "target": target,
        },
        "repair_seconds": seconds,
        "peak_rss_gb": rss,
    }


def run_safe_lora(world: SmallWorld, adapter: str, share: float, out: Path) -> dict[str, Any]:
    """The Safe LoRA-style baseline: no model, no prompts, the two base weight files; the
    ``share`` of modules least like their projection projected."""
    from baselines import safe_lora
    from safetensors.torch import load_file

    from adapter_repair.adapter import load_adapter, save_adapter

    t0 = time.perf_counter()
    lora = load_adapter(world.adapter_dir(adapter))
    aligned = load_file(str(world.aligned_dir / "model.safetensors"))
    unaligned = load_file(str(world.unaligned_dir / "model.safetensors"))
    fixed, record = safe_lora(lora, aligned, unaligned, share)
    seconds = time.perf_counter() - t0
    rss = peak_rss_gb()
    save_adapter(fixed, out / "adapter")
    return {
        "repair": {"changed": record["changed"], "stopped": "-", "kept_step": None, **record},
        "repair_seconds": seconds,
        "peak_rss_gb": rss,
    }


def run_irr(world: SmallWorld, adapter: str, out: Path) -> dict[str, Any]:
    """IRR: the adapter merged into dense float32 weights, the unsafe entries of each adapted
    weight's delta removed and the rest recalibrated on task rows (bench/baselines.py, IRR).
    Its output is a dense model, measured in place (bfloat16, like the zoo)."""
    import torch
    from baselines import IRR, irr
    from safetensors.torch import load_file

    from adapter_repair.adapter import load_adapter
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import attach_adapter, load_base, load_tokenizer
    from adapter_repair.repair.losses import answer_batches

    base = load_base(LoadConfig(base=str(world.aligned_dir), quant="none", dtype="float32"))
    tok = load_tokenizer(None, str(world.aligned_dir))
    lora = load_adapter(world.adapter_dir(adapter))
    model = attach_adapter(base, world.adapter_dir(adapter)).merge_and_unload()
    aligned = load_file(str(world.aligned_dir / "model.safetensors"))
    unaligned = load_file(str(world.unaligned_dir / "model.safetensors"))
    t0 = time.perf_counter()  # the repair alone, as for ours
    rows = world.task_guard(int(IRR["calibration_rows"]))
    assert rows.answers is not None  # task rows carry their answers
    calibration = answer_batches(tok, list(zip(rows.prompts, rows.answers, strict=True)), 16, 16)
    record = irr(model, [m.base_name for m in lora], aligned, unaligned, calibration)
    seconds = time.perf_counter() - t0
    rss = peak_rss_gb()
    del aligned, unaligned
    return {
        "measures": measure_into(out, world, model.to(torch.bfloat16), tok, f"{adapter} irr"),
        "repair": {
            "changed": record["removed"],
            "stopped": "-",
            "kept_step": None,
            "settings": IRR,
            **record,
        },
        "repair_seconds": seconds,
        "peak_rss_gb": rss,
    }


def run_oneshot(world: SmallWorld, adapter: str, out: Path) -> dict[str, Any]:
    """The one-shot safety patch: the adapter's factors fine-tuned over the 4-bit base on a
    single refusal example, the first probe prompt the aligned base refuses, with its own
    greedy refusal (bench/baselines.py, ONE_SHOT)."""
    from baselines import ONE_SHOT, one_shot_patch

    from adapter_repair.adapter import save_adapter
    from adapter_repair.measure import prompts as P
    from adapter_repair.measure.config import GenerationConfig
    from adapter_repair.measure.generation import generate
    from adapter_repair.measure.judges import load_judge
    from adapter_repair.measure.measures import use_adapter
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import load_model, load_tokenizer
    from adapter_repair.model.walk import walk
    from adapter_repair.repair.factors import all_factors, to_adapter

    load = LoadConfig(base=str(world.aligned_dir), quant="4bit", dtype="bfloat16")
    model, lora = load_model(world.adapter_dir(adapter), load)
    tok = load_tokenizer(None, str(world.aligned_dir))
    t0 = time.perf_counter()  # the repair alone (its refusal example included), as for ours
    probe = list(P.harmful("probe").take(64).prompts)
    gen = GenerationConfig(max_new_tokens=64, batch_size=64, progress=False)
    with use_adapter(model, None):
        answers = generate(model, tok, probe, gen)
    harmful = load_judge("substring").harmful(probe, answers)
    prompt, refusal = next((p, a) for p, a, h in zip(probe, answers, harmful, strict=True) if not h)
    record = one_shot_patch(model, tok, prompt, refusal)
    seconds = time.perf_counter() - t0
    rss = peak_rss_gb()
    model_map = walk(model)
    save_adapter(to_adapter(lora, all_factors(model_map), model_map), out / "adapter")
    return {
        "repair": {
            "changed": record["changed"],
            "stopped": "-",
            "kept_step": None,
            "example": {"prompt": prompt, "refusal": refusal},
            "losses": record["losses"],
            "settings": ONE_SHOT,
        },
        "repair_seconds": seconds,
        "peak_rss_gb": rss,
    }


def peak_rss_gb() -> float:
    """This process's peak resident set size (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def repair_zoo_adapter(
    world: SmallWorld, adapter: str, method: str, keep_checkpoints: bool = False
) -> tuple[Any, float]:
    """Our repair of one zoo adapter over the 4-bit aligned base with the bench's settings and
    guard: (RepairResult, seconds of the repair alone)."""
    from adapter_repair.measure import prompts as P
    from adapter_repair.measure.judges import load_judge
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import load_model, load_tokenizer
    from adapter_repair.repair.guard import Guard
    from adapter_repair.repair.pipeline import repair

    load = LoadConfig(base=str(world.aligned_dir), quant="4bit", dtype="bfloat16")
    model, lora = load_model(world.adapter_dir(adapter), load)
    tok = load_tokenizer(None, str(world.aligned_dir))
    t0 = time.perf_counter()
    result = repair(
        model,
        tok,
        lora,
        repair_config(method),
        probe=P.harmful("probe"),
        guard=Guard(world.task_guard(guard_rows(method)), P.benign("benign"), "choice"),
        judge=load_judge("substring"),
        keep_checkpoints=keep_checkpoints,
    )
    return result, time.perf_counter() - t0


def run_one(world: SmallWorld, adapter: str, method: str) -> None:
    """Repair one zoo adapter over the 4-bit aligned base, save it, measure it."""
    from adapter_repair.adapter import save_adapter

    def measure(out: Path) -> dict[str, Any]:
        merged, mtok = world.load_merged(out / "adapter")
        return measure_into(out, world, merged, mtok, f"{adapter} {method}")

    def make(out: Path) -> dict[str, Any]:
        share = safe_lora_share(method)
        if share is not None:
            facts = run_safe_lora(world, adapter, share, out)
            return {**facts, "measures": measure(out)}
        if method == "dense":
            return run_dense(world, adapter, out)
        if method == "irr":
            return run_irr(world, adapter, out)
        if method == "oneshot":
            return {**run_oneshot(world, adapter, out), "measures": measure(out)}
        result, seconds = repair_zoo_adapter(world, adapter, method)
        rss = peak_rss_gb()
        save_adapter(result.adapter, out / "adapter")
        return {
            "measures": measure(out),
            "repair": result.as_dict(),
            "repair_seconds": seconds,
            "peak_rss_gb": rss,
        }

    artifact(world, adapter, method).build(world.root, make)


def nf4_artifact(world: SmallWorld, adapter: str | None, method: str) -> Artifact:
    """Harm, over-refusal and SST-2 over the 4-bit NF4 aligned base, the base the repair ran
    on and its stop rule and task guard measured over (a QLoRA adapter merged into the
    bfloat16 base is not the model its training or its repair saw): of the aligned base itself (``adapter`` None), a zoo
    adapter (``method`` none) or a repaired one."""
    if adapter is None:
        source = {"aligned": world.artifacts["aligned"].key}
    elif method == "none":
        source = {"adapter": world.artifacts[f"adapter-{adapter}"].key}
    else:
        source = {"repaired": artifact(world, adapter, method).key}
    payload = {
        **source,
        "quant": "4bit",
        "dtype": "bfloat16",
        "sets": ["eval", "xstest-unsafe", "xstest-safe", "sst2-dev"],
        "measured_by": measured_by(),
    }
    return Artifact(f"nf4-{adapter or 'aligned'}-{method}", payload)


def run_nf4(world: SmallWorld, adapter: str | None, method: str) -> None:
    """Measure one row over the 4-bit base (unmerged, as `PeftModel.from_pretrained` loads it)."""
    from adapter_repair.model.config import LoadConfig
    from adapter_repair.model.loading import load_base, load_model, load_tokenizer

    def make(out: Path) -> dict[str, Any]:
        load = LoadConfig(base=str(world.aligned_dir), quant="4bit", dtype="bfloat16")
        model: Any
        if adapter is None:
            model = load_base(load)
        else:
            folder = (
                world.adapter_dir(adapter)
                if method == "none"
                else artifact(world, adapter, method).path(world.root) / "adapter"
            )
            model, _ = load_model(folder, load)
        tok = load_tokenizer(None, str(world.aligned_dir))
        label = f"{adapter or 'aligned'} {method} nf4"
        report = world.measure(model, tok, label)
        (out / "measures.json").write_text(json.dumps(report.as_dict(), indent=2))
        return {"measures": {k: v.as_dict() for k, v in report.measures.items()}}

    nf4_artifact(world, adapter, method).build(world.root, make)


#: methods whose output is a dense model: no row over 4-bit
NO_NF4 = ("dense", "irr")
