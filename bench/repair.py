"""Repair over the small-world zoo: for each adapter and method, the harmful rate (AdvBench
eval, XSTest unsafe), over-refusal (XSTest safe), SST-2 accuracy, the share of adapter
coordinates changed, the repair's wall time and peak RSS; the issue's targets checked. Writes
bench/results/repair.md and .json (ours on every zoo adapter, the comparison methods on three)
and bench/results/ablation.md and .json (restore with one lever moved, on the same three).

    python bench/repair.py [--adapters all|k100-r8,...] [--compare k100-r8,k250-r16,k25-r16]
                           [--methods restore] [--baselines published,safelora,dense,...]
                           [--variants restore-heal,...] [--sst2 bench/data/sst2]
                           [--cache-dir DIR] [--no-run] [--no-nf4]

Each (adapter, method) runs in its own process (so its peak RSS is its own) and is cached as
an artifact of the small world, keyed by the adapter's recipe, the settings and what measured
it (a digest of the code that measures it: the package but its CLI, its Hub client, its
repair settings' file and its report rendering, and bench/repair_runs.py with what it
imports; the judge, the prompt sets). This file chooses the rows and their order;
bench/repair_tables.py writes the tables; neither is in the digest. The
settings are in the key themselves, resolved: a changed default reruns exactly the rows that
use it. Rerunning after an interruption resumes where it stopped; ``--no-run`` only writes the
tables of what is done. A table holds only rows this machine's cache holds: nothing is carried
from another machine or an earlier session. The zoo must be built first (``python
bench/bed.py``).

Repair runs over the 4-bit aligned base (as the adapters were trained and as
``PeftModel.from_pretrained`` loads them); the task guard is SST-2 rows held out from the
adapters' training and from the dev set the table scores. Each repaired adapter is measured
merged into the bfloat16 base (like the zoo) and, for harm and over-refusal, over the 4-bit
base.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from repair_runs import (
    DIGEST_ENV,
    HERE,
    MEASURED_BY,
    NO_NF4,
    artifact,
    nf4_artifact,
    reference_artifact,
    run_nf4,
    run_one,
    run_reference,
)
from repair_settings import BASELINES, COMPARE_ADAPTERS, DEFAULT_VARIANTS, METHODS, OURS, VARIANTS
from repair_tables import Plan, write_tables

from adapter_repair.beds.small import small_world


def names(value: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A comma list checked against ``known`` ("all": every one of them)."""
    if value == "all":
        return known
    out = tuple(x for x in value.split(",") if x)
    bad = [x for x in out if x not in known]
    if bad:
        sys.exit(f"error: unknown {what} {bad}; choose from {', '.join(known)} (or all)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--adapters", default="all", help="Zoo adapters ours runs on (default all).")
    ap.add_argument("--compare", default=",".join(COMPARE_ADAPTERS), help="Adapters the "
                    "comparison methods and the ablation run on.")  # fmt: skip
    ap.add_argument("--methods", default=",".join(OURS), help="Ours, on --adapters.")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="Comparison methods, on"
                    " --compare (also: project, both; all: every one).")  # fmt: skip
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="Ablation variants,"
                    " on --compare (all: every one, ratio, grad and no-rollback too).")  # fmt: skip
    ap.add_argument("--sst2", default=str(HERE / "data" / "sst2"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-run", action="store_true", help="Only write the tables of what is done.")
    ap.add_argument(
        "--no-nf4",
        action="store_true",
        help="Skip measuring harm and over-refusal over the 4-bit base.",
    )
    ap.add_argument("--one", nargs=2, metavar=("ADAPTER", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    world = small_world(cache_dir=args.cache_dir, sst2=args.sst2)
    if args.one:
        given = os.environ.get(DIGEST_ENV)
        if given is not None and given != MEASURED_BY["code"]:
            sys.exit(
                "error: the code changed since this bench started (its digest differs): a row"
                " now would be keyed apart from the run that asked for it; rerun python"
                " bench/repair.py"
            )
        run_one(world, *args.one)
        return
    zoo = tuple(e.name for e in world.recipe.zoo)
    plan = Plan(
        adapters=names(args.adapters, zoo, "adapter(s)"),
        compare=names(args.compare, zoo, "adapter(s)"),
        methods=names(args.methods, METHODS, "method(s)"),
        baselines=names(args.baselines, (*METHODS, *BASELINES), "baseline(s)"),
        variants=names(args.variants, tuple(VARIANTS), "variant(s)"),
    )
    if not args.no_run:
        for name in dict.fromkeys((*plan.adapters, *plan.compare)):
            if not world.artifacts[f"adapter-{name}"].done(world.root):
                sys.exit(f"error: zoo adapter {name} is not built; run python bench/bed.py first")
        failed: list[str] = []
        env = {**os.environ, DIGEST_ENV: MEASURED_BY["code"]}
        for adapter, method in plan.runs():
            for ref in (None, adapter):
                if not reference_artifact(world, ref).done(world.root):
                    run_reference(world, ref)
            if not artifact(world, adapter, method).done(world.root):
                cmd = [sys.executable, __file__, "--one", adapter, method, "--sst2", args.sst2]
                if args.cache_dir:
                    cmd += ["--cache-dir", args.cache_dir]
                if subprocess.run(cmd, env=env).returncode != 0:  # the rest still runs
                    failed.append(f"{adapter}/{method}")
                    logging.error("%s/%s failed; going on", adapter, method)
                    continue
            if not args.no_nf4 and method not in NO_NF4:
                for row in ((None, "none"), (adapter, "none"), (adapter, method)):
                    if not nf4_artifact(world, *row).done(world.root):
                        run_nf4(world, *row)
            write_tables(world, plan)
        if failed:
            write_tables(world, plan)
            sys.exit(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see the log)")
    write_tables(world, plan)


if __name__ == "__main__":
    main()
