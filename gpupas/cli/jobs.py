"""``gpupas plan`` and ``gpupas compact``: storage plans and the Dask job that carries one out.

Registered on :data:`gpupas.cli.app.app` by importing this module; nothing heavy is imported
until a command runs (planners import networkx, jobs import dask).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from gpupas.cli import render
from gpupas.cli.app import ArchiveOpt, JsonOpt, _command, _location, _out, app
from gpupas.errors import InvalidInputError

AlphaOpt = Annotated[float | None, typer.Option("--alpha", metavar="A", help=(
    "Recreation budget of each snapshot: A x its restore time under the fastest plan (the shortest-path tree; "
    "times are modelled from stored and raw bytes by gpupas.plan.costs, not measured on each snapshot); "
    "may store more than now. Default: each snapshot no slower to restore than now (store less, or change "
    "nothing: an archive of whole snapshots then stays as it is; give --alpha to trade restore time for space)."))]
SchemeOpt = Annotated[str, typer.Option("--scheme", metavar="SCHEME", help=(
    "How a group's recreation adds up: independent (sum) or parallel (max)."))]
BudgetOpt = Annotated[list[str] | None, typer.Option("--budget", metavar="SNAPSHOT=SECONDS", help=(
    "An absolute recreation budget for one snapshot, in modelled seconds; repeatable."))]
PairOpt = Annotated[list[str] | None, typer.Option("--pair", metavar="BASE:SNAPSHOT", help=(
    "Also consider SNAPSHOT as a delta on BASE; repeatable."))]
SampleOpt = Annotated[float, typer.Option("--sample", metavar="FRACTION", help=(
    "Fraction of each tensor encoded to estimate sizes of edges the archive does not store (1: exact)."))]


def _budgets(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        sid, sep, sec = item.partition("=")
        try:
            out[sid] = float(sec)
        except ValueError:
            sep = ""
        if not sep or not sid:
            raise InvalidInputError(f"--budget {item!r} must look like SNAPSHOT=SECONDS")
    return out


def _pairs(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        base, sep, sid = item.partition(":")
        if not sep or not base or not sid:
            raise InvalidInputError(f"--pair {item!r} must look like BASE:SNAPSHOT")
        out.append((base, sid))
    return out


def _check(alpha: float | None, scheme: str, sample: float) -> None:
    if alpha is not None and (math.isnan(alpha) or alpha < 1):
        raise InvalidInputError(f"--alpha must be at least 1 (1: as fast as the fastest plan), not {alpha:g}")
    if scheme not in ("independent", "parallel"):
        raise InvalidInputError(f"--scheme must be independent or parallel, not {scheme!r}")
    if not 0 < sample <= 1:
        raise InvalidInputError(f"--sample must lie in (0, 1], not {sample:g}")


def render_plan(o: render.Output, p: Any) -> None:
    """The plans side by side, then the chosen plan per snapshot."""
    from gpupas.plan.archive import COMPARE

    t = render.table(["plan", "stored", "vs whole", "recreation (sum)", "slowest snapshot", "deepest chain",
                      "budgets"], right=["stored", "vs whole", "recreation (sum)", "slowest snapshot", "deepest chain"],
                     title=(f"plans at alpha {p.alpha:g}" if p.alpha is not None else
                            "plans restoring no snapshot slower than now") + f" ({p.scheme}); recreation in modelled "
                     "seconds")
    whole = p.plans["materialized"].storage
    for name, plan in [("current", p.current), *((k, p.plans[k]) for k in COMPARE)]:
        label = f"{name} (chosen)" if plan is p.plan and (name != "current" or p.chosen == "current") else name
        ok = "met" if not plan.violations else f"{len(plan.violations)} over"
        render.row(t, label, render.size(plan.storage) + ("" if p.measured(plan) else " ~"),
                   render.pct(plan.storage, whole), f"{plan.total_recreation:.3f}",
                   f"{max(plan.recreation.values(), default=0):.3f}", plan.max_depth, ok)
    o.table(t)
    s = render.table(["snapshot", "base now", "depth", "recreation", "planned base", "depth ", "recreation ",
                      "budget", "stored"], right=["depth", "recreation", "depth ", "recreation ", "budget", "stored"])
    for r in p.rows():
        now = (r["base_now"] or "(whole)") + (" (dropped)" if r["base_now_dropped"] else "")
        render.row(s, r["snapshot"], now, r["depth_now"], f"{r['recreation_now']:.3f}",
                   r["base"] or "(whole)", r["depth"], f"{r['recreation']:.3f}",
                   "-" if r["budget"] is None else f"{r['budget']:.3f}",
                   render.size(r["stored"]) + ("" if r["measured"] else " ~"))
    o.table(s)
    o.note(f"cost model: {p.model.describe()}; ~ = sampled estimate: {p.estimates.describe()}")
    for v in p.plan.violations:
        o.warn(f"budget not met: {v}")
    if p.chosen == "current":
        o.note(p.notes[-1])
    elif p.plan.storage > p.current.storage:
        o.warn("this plan stores more than the archive does now: its budgets need faster restores than deltas "
               "give (a larger --alpha stores less; without --alpha nothing is restored slower than now)")


@app.command()
@_command
def plan(alpha: AlphaOpt = None, scheme: SchemeOpt = "independent", budget: BudgetOpt = None, pair: PairOpt = None,
         sample: SampleOpt = 1 / 16,
         planner: Annotated[str, typer.Option("--planner", metavar="NAME", help=(
             "Which plan to show per snapshot: pas (the better of pas-mt and pas-pt), pas-mt, pas-pt, last, mst, "
             "spt, materialized."))] = "pas",
         archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Plan which snapshots to store whole and which as deltas on which base, under recreation budgets
    (PAS); prints the plan next to all-materialized, MST and SPT. Changes nothing (see compact)."""
    from gpupas.archive import open_archive
    from gpupas.plan.archive import plan_archive

    _check(alpha, scheme, sample)
    with open_archive(_location(archive)) as a:
        if not a.store.list_snapshots():
            raise InvalidInputError(f"archive {a.location} has no snapshots to plan")
        p = plan_archive(a, alpha, scheme=scheme, budgets=_budgets(budget), pairs=_pairs(pair), fraction=sample,
                         planner=planner, no_slower=alpha is None)
    if as_json:
        _out().json(p.to_dict())
    else:
        render_plan(_out(), p)


@app.command()
@_command
def compact(alpha: AlphaOpt = None, scheme: SchemeOpt = "independent", budget: BudgetOpt = None,
            pair: PairOpt = None, sample: SampleOpt = 1 / 16,
            plan_file: Annotated[Path | None, typer.Option("--plan", metavar="FILE", help=(
                "Carry out this plan (gpupas plan --json output) instead of planning again."))] = None,
            setting: Annotated[str | None, typer.Option("--setting", metavar="NAME", help=(
                "Also re-encode every snapshot with this setting (fast, default, strong)."))] = None,
            codec: Annotated[str | None, typer.Option("--codec", metavar="IDS", help=(
                "Also re-encode every snapshot with these chunk codecs only (comma-separated, e.g. zstd)."))] = None,
            dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Show what would change; change nothing.")
                               ] = False,
            scheduler: Annotated[str | None, typer.Option("--scheduler", metavar="ADDRESS", help=(
                "Dask scheduler address (default, or 'local': a local cluster of worker processes; 'sync': "
                "inline)."))] = None,
            workers: Annotated[int, typer.Option("--workers", metavar="N", help="Worker processes of a local cluster."
                                                 )] = 2,
            archive: ArchiveOpt = None, as_json: JsonOpt = False) -> None:
    """Carry a storage plan out on Dask: re-base (and optionally re-encode) snapshots by atomic, bit-exact
    revisions. Safe to kill and rerun; the old forms become garbage for `gpupas gc`."""
    from gpupas.jobs.compact import compact_archive, load_target

    _check(alpha, scheme, sample)
    codecs = [c.strip() for c in codec.split(",") if c.strip()] if codec else None
    if codecs is not None:
        from gpupas.codecs import registry

        for c in codecs:
            if c not in registry.known():  # a typo is bad input here, not an archive from a newer gpupas
                raise InvalidInputError(f"--codec {c!r} is not a chunk codec; use {', '.join(registry.known())}")
    result = compact_archive(_location(archive), target=load_target(plan_file) if plan_file else None, alpha=alpha,
                             scheme=scheme, budgets=_budgets(budget), pairs=_pairs(pair), fraction=sample,
                             setting=setting, codecs=codecs, dry_run=dry_run, scheduler=scheduler, workers=workers,
                             no_slower=alpha is None)
    o = _out()
    if as_json:
        o.json(result.to_dict())
        return
    d = result.to_dict()
    verb = "would revise" if dry_run else "revised"
    for c in d["changes"]:
        o.data(f"{verb} {c['snapshot']}: base {c['old_base'] or '(whole)'} -> {c['base'] or '(whole)'} ({c['why']})")
    for note in d["notes"] + [r["note"] for r in d["revised"] if r["note"].startswith("not revised")]:
        o.warn(note)
    if dry_run:
        n = len({c["snapshot"] for c in d["changes"]})  # a format 1/2 snapshot may take two revisions
        o.line(f"{n} snapshot(s) would change in {len(d['changes'])} revision(s) ({d['decodes']} decodes); "
               "nothing was changed")
    else:
        done = len({r["snapshot"] for r in d["revised"] if r["done"]})
        before, after = d["stored_before"], d["stored_after"]
        change = f"{after - before:+,} bytes" + (f", {(after - before) / before:+.2%}" if before else "")
        o.line(f"{done} snapshot(s) revised; stored {before:,} -> {after:,} bytes ({change}); old forms are "
               "garbage for `gpupas gc` after its grace period" + (
                   f", and so are {len(d['unkept'])} snapshot(s) no version keeps (dropped, or left by a killed "
                   f"commit), {d['stored_unkept']:,} of the {after:,} bytes" if d["unkept"] else ""))
