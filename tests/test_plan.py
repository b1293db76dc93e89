"""Storage plans: the arborescence against networkx, planners against brute force, budgets as properties,
the storage graph of a real archive (measured and sampled sizes), and plans as revisions."""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpupas
from gpupas.plan.arborescence import min_arborescence
from gpupas.plan.costs import CostModel, fit
from gpupas.plan.graph import ROOT, StorageGraph, evaluate
from gpupas.plan.measure import storage_graph
from gpupas.plan.planners import Problem, plan_all
from gpupas.plan.realize import changes, project
from gpupas.plan.synthetic import paper_graph


def random_graph(rng: random.Random, n: int, groups: bool) -> StorageGraph:
    g = StorageGraph()
    vs = [f"s{i}" for i in range(n)]
    for v in vs:
        g.add_vertex(v, rng.uniform(80, 120), rng.uniform(1, 2))
    for _ in range(rng.randint(1, 3 * n)):
        a, b = rng.sample(vs, 2)
        g.add_edge(a, b, rng.uniform(5, 95), rng.uniform(0.1, 1.5))
    if groups:
        k = rng.randint(1, n)
        g.groups = {f"g{j}": sorted(set(rng.sample(vs, rng.randint(1, n)))) for j in range(k)}
    return g


def brute(g: StorageGraph, budgets: dict | None, scheme: str) -> float:
    """The least storage of any spanning tree that meets ``budgets`` (inf if none does)."""
    vs = g.vertices
    best = float("inf")
    for combo in itertools.product(*(list(g.edges[v]) for v in vs)):
        try:
            p = evaluate(g, dict(zip(vs, combo)), scheme=scheme, budgets=budgets)
        except ValueError:  # a cycle
            continue
        if not p.violations:
            best = min(best, p.storage)
    return best


def test_arborescence_matches_networkx() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 10)
        edges = [(0, v, rng.randint(20, 40)) for v in range(1, n)]
        edges += [(u, v, rng.randint(1, 40)) for u, v in ((rng.randrange(n), rng.randrange(1, n))
                                                           for _ in range(rng.randint(0, 4 * n))) if u != v]
        chosen = min_arborescence(n, 0, edges)
        assert chosen[0] == -1 and all(edges[chosen[v]][1] == v for v in range(1, n))
        g = nx.DiGraph()
        for u, v, w in edges:
            if not g.has_edge(u, v) or g[u][v]["weight"] > w:
                g.add_edge(u, v, weight=w)
        want = sum(d["weight"] for *_, d in nx.minimum_spanning_arborescence(g).edges(data=True))
        assert sum(edges[chosen[v]][2] for v in range(1, n)) == want


@pytest.mark.parametrize("scheme", ["independent", "parallel"])
def test_planners_against_brute_force(scheme: str) -> None:
    rng = random.Random(1 if scheme == "independent" else 2)
    optimal = total = 0
    for _ in range(120):
        g = random_graph(rng, rng.randint(2, 6), groups=rng.random() < 0.5)
        alpha = rng.choice([1.0, 1.2, 1.5, 2.0, 3.0])
        plans = plan_all(g, alpha, scheme=scheme)
        budgets = plans["pas-mt"].budgets
        assert plans["mst"].storage == pytest.approx(brute(g, None, scheme))
        d = nx.single_source_dijkstra_path_length(g.to_networkx(), ROOT, weight="recreation")
        spt = evaluate(g, plans["spt"].parent, scheme=scheme)
        assert all(spt.recreation[v] == pytest.approx(d[v]) for v in g.vertices if [v] == g.group_list().get(v))
        best = brute(g, budgets, scheme)
        for name in ("last", "pas-mt", "pas-pt"):
            assert plans[name].feasible, (name, plans[name].violations)
            assert plans[name].storage >= best - 1e-6
        assert plans["pas"].storage <= plans["last"].storage + 1e-6
        total += 1
        optimal += plans["pas"].storage <= best + 1e-6
    assert optimal >= 0.9 * total  # PAS is a heuristic; on small graphs it is nearly always optimal


def test_a_chain_limit_that_leaves_no_room_below_the_shortest_paths() -> None:
    """s0 meets its budget only as a delta on s3 stored whole, but s3's shortest path is through s4 (0 s), so
    under one link every tree the repair reaches puts s0 too deep or too slow (seed 2276 of a search of random
    graphs against brute force: 18 of 11,449 feasible instances ended with a violation)."""
    g = StorageGraph()
    for v, cs, cr in [("s0", 86.5, 1.62), ("s1", 83.7, 1.2), ("s2", 100, 1.0), ("s3", 92.6, 1.06), ("s4", 86, 1.0)]:
        g.add_vertex(v, cs, cr)
    for a, b, cs, cr in [("s4", "s0", 10, 0.5), ("s3", "s0", 68, 0), ("s3", "s2", 0, 1.05), ("s4", "s3", 0, 0),
                         ("s2", "s3", 0, 1.48), ("s0", "s3", 10, 0.5), ("s0", "s4", 10, 0.28), ("s3", "s4", 0, 0)]:
        g.add_edge(a, b, cs, cr)
    g.groups = {"g0": ["s1", "s2", "s4"], "g1": ["s1"]}
    plans = plan_all(g, 2.0, scheme="parallel", absolute={"s0": 1.06, "s3": 1.06}, max_depth=1)
    best = plans["pas"]
    assert best.feasible and best.max_depth <= 1, [str(v) for v in best.violations]
    assert best.storage == pytest.approx(244.3)  # the optimum, by brute force over trees of at most one link


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 30), scheme=st.sampled_from(["independent", "parallel"]),
       alpha=st.floats(1.0, 4.0), tight=st.floats(0.3, 1.5), depth=st.one_of(st.none(), st.integers(1, 4)))
def test_no_plan_exceeds_a_budget_it_reports_met(seed: int, n: int, scheme: str, alpha: float, tight: float,
                                                 depth: int | None) -> None:
    rng = random.Random(seed)
    g = random_graph(rng, n, groups=rng.random() < 0.5)
    spt = plan_all(g, 1.0, scheme=scheme, planners=("spt",))["spt"]
    absolute = {gr: c * tight for gr, c in spt.recreation.items() if rng.random() < 0.3}  # some below the SPT's
    plans = plan_all(g, alpha, scheme=scheme, absolute=absolute, max_depth=depth)
    budgets = plans["pas-mt"].budgets
    for name in ("pas-mt", "pas-pt"):
        p = plans[name]
        flagged = {v.group for v in p.violations}
        for gr, cost in p.recreation.items():
            if gr not in flagged:
                assert cost <= budgets[gr] * (1 + 1e-9) + 1e-12, (name, gr)
        for v in p.violations:  # said, with a reason: below the SPT's recreation, or chains too deep
            assert v.reason
            if v.reason.startswith("no plan can meet it"):
                assert spt.recreation[v.group] > budgets[v.group]
        if depth is not None and not any(str(v.group).startswith("chain") for v in p.violations):
            assert p.max_depth <= depth
        if depth is None and not absolute:
            assert p.feasible  # alpha >= 1: the SPT meets every budget, so PAS does too
    if depth is None and not absolute:
        assert plans["last"].feasible
        assert min(plans["pas-mt"].storage, plans["pas-pt"].storage) <= plans["last"].storage * (1 + 1e-9)


def test_the_better_pas_plan_never_stores_more_than_last() -> None:
    """Graphs with a training run's chain of cheap consecutive deltas: here the MST repaired can end above
    LAST (found on a notebook's archive; 45 of 3,000 such graphs before PAS-MT also tried LAST's tree)."""
    for seed in range(250):
        rng = random.Random(seed)
        n = rng.randint(3, 14)
        g = random_graph(rng, n, groups=rng.random() < 0.5)
        for i in range(1, n):
            g.add_edge(f"s{i - 1}", f"s{i}", rng.uniform(5, 40), rng.uniform(0.1, 1.0))
        alpha, scheme = rng.choice([1.5, 2, 3, 4, 6, 8, 12]), rng.choice(["independent", "parallel"])
        plans = plan_all(g, alpha, scheme=scheme)
        assert plans["pas-mt"].feasible and plans["pas-pt"].feasible, seed
        if plans["last"].feasible:
            assert plans["pas"].storage <= plans["last"].storage * (1 + 1e-9), (seed, alpha, scheme)


def test_zero_second_edges_both_ways_give_a_shortest_path_tree_not_a_cycle() -> None:
    """Deltas a <-> b that recreate in 0 s: each is on a shortest path of the other, and each one's cheapest
    predecessor alone (the other) made the SPT a cycle: plan_all raised ValueError before any planner ran."""
    g = StorageGraph()
    for v in "ab":
        g.add_vertex(v, 100, 1.0)
    g.add_edge("a", "b", 10, 0.0)
    g.add_edge("b", "a", 10, 0.0)
    for scheme in ("independent", "parallel"):
        plans = plan_all(g, 1.0, scheme=scheme)
        assert plans["spt"].storage == 110 and plans["spt"].recreation == {"a": 1.0, "b": 1.0}
        assert all(plans[k].feasible and plans[k].storage == 110 for k in ("last", "pas-mt", "pas-pt", "pas"))


def _chain_abc() -> StorageGraph:
    """a, b, c: 100 bytes and 1 s each whole; b a delta on a and c on b, 10 bytes and 0.5 s each."""
    g = StorageGraph()
    for v in "abc":
        g.add_vertex(v, 100, 1.0)
    g.add_edge("a", "b", 10, 0.5)
    g.add_edge("b", "c", 10, 0.5)
    return g


def test_unmeetable_budget_is_named_with_its_reason() -> None:
    g = _chain_abc()
    plans = plan_all(g, None, absolute={"c": 0.5})
    for name in ("pas-mt", "pas-pt"):
        (v,) = plans[name].violations
        assert v.group == "c" and "even the shortest-path tree takes 1 s" in v.reason
    deep = plan_all(g, 4.0, max_depth=1)["pas"]
    assert deep.feasible and deep.max_depth <= 1 and deep.storage == 210  # a -> b, c whole (or b whole, b -> c)


def test_a_budget_only_chains_too_long_could_meet_is_named_with_that_reason() -> None:
    """c meets 2 s only as a -> b -> c (2 links); with at most 1 link its fastest is 3.5 s (b whole, c on b). The
    SPT meets the budget, so it was reported as the planner's failure ("found no re-parenting"), not as a
    budget that no plan within the chain limit can meet."""
    g = StorageGraph()
    for v, rec in (("a", 1.0), ("b", 3.0), ("c", 5.0)):
        g.add_vertex(v, 100, rec)
    g.add_edge("a", "b", 10, 0.5)
    g.add_edge("b", "c", 10, 0.5)
    for scheme in ("independent", "parallel"):
        plans = plan_all(g, None, scheme=scheme, absolute={"c": 2.0}, max_depth=1)
        for name in ("pas-mt", "pas-pt"):
            (v,) = plans[name].violations
            assert v.group == "c" and "no plan with chains of at most 1 link can meet it" in v.reason, v.reason
            assert "the fastest such chains take 3.5 s" in v.reason
        assert plans["pas"].max_depth <= 1


def test_paper_graph_plans_are_within_budget() -> None:
    g = paper_graph(8, 10, 16)  # 1,280 tensor vertices (benchmarks/plan.py times 4,800)
    for scheme in ("independent", "parallel"):
        plans = plan_all(g, 1.5, scheme=scheme)
        assert all(plans[k].feasible for k in ("last", "pas-mt", "pas-pt"))
        assert min(plans["pas-mt"].storage, plans["pas-pt"].storage) <= plans["last"].storage
        assert plans["mst"].storage <= plans["pas"].storage <= plans["spt"].storage


def test_cost_model_fit_recovers_coefficients() -> None:
    truth = CostModel(4e-9, 1e-9, 3e-9, 2e-3)
    rng = random.Random(0)
    samples = []
    for _ in range(20):
        raw = rng.randint(1 << 16, 1 << 27)
        delta = raw * rng.choice([0, 1])
        stored = int(raw * rng.uniform(0.2, 0.9))
        samples.append((stored, raw, delta, truth.seconds(stored, raw, delta)))
    got = fit(samples)
    for a, b in zip((got.per_stored, got.per_raw, got.per_delta, got.per_link),
                    (truth.per_stored, truth.per_raw, truth.per_delta, truth.per_link)):
        assert a == pytest.approx(b, rel=1e-3)


# -- a real archive ---------------------------------------------------------------------------------------------
def run_archive(path: Path, n: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = {"w": (rng.standard_normal((256, 128)) * 0.02).astype(np.float32),
         "e": (rng.standard_normal((512, 64)) * 0.02).astype(np.float32),
         "b": rng.standard_normal(300).astype(np.float16)}
    snaps = []
    with gpupas.create_repository(path) as repo:
        for _ in range(n):
            w = {k: (v + rng.standard_normal(v.shape).astype(v.dtype) * np.asarray(1e-4, v.dtype)).astype(v.dtype)
                 for k, v in w.items()}
            w["e"][rng.random(512) < 0.5] = snaps[-1]["e"][0] if snaps else 0  # rows that do not change
            snaps.append({k: v.copy() for k, v in w.items()})
        v1 = repo.commit("run", snaps[: n // 2])
        repo.commit("ft", snaps[n // 2:], parents=[v1.id])
    return snaps


def test_storage_graph_of_an_archive(tmp_path: Path) -> None:
    run_archive(tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        sids = a.snapshots()
        g, est = storage_graph(a, fraction=1 / 4)
        assert set(g.vertices) == set(sids)
        for sid in sids:
            m = a.manifest(sid)
            e = g.edge(m.base or ROOT, sid)  # the stored edge: measured
            assert e.measured and e.storage == m.stored_bytes
        assert (sids[0], sids[2]) in {(u, v) for v in g.edges for u in g.edges[v] if u != ROOT}  # two back
        assert len(est.errors()) == len(sids) and max(abs(x) for x in est.errors()) < 0.5
        exact, _ = storage_graph(a, fraction=1.0)
        for v, ins in exact.edges.items():
            for u, e in ins.items():
                if not g.edge(u, v).measured:
                    assert g.edge(u, v).storage == pytest.approx(e.storage, rel=0.5)
        tg, _ = storage_graph(a, granularity="tensor", fraction=1 / 4)
        assert set(tg.groups) == set(sids) and len(tg.vertices) == 3 * len(sids)
        plans = plan_all(tg, 2.0)
        assert set(project(plans["pas"].parent)) == set(sids)


def test_a_lossy_snapshot_is_sized_in_its_representation(tmp_path: Path) -> None:
    """A lossy snapshot as a delta is sized as a revision stores it (its lossy tensors in their representation,
    whole): sized as a lossless delta of what it restores to, a bf16 release of a lossless snapshot's weights
    cost nothing on it, so a plan re-based it there and compact stored all it did before, one link deeper."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    with gpupas.create_archive(tmp_path / "a") as a:
        s0 = a.commit({"w": (rng.standard_normal((512, 256)) * 0.02).astype(np.float32)}, lossy="kmeans:4")
        x = a.restore(s0.id)["w"].copy()
        x[::7] = (x[::7] + np.float32(1e-3)).astype(ml_dtypes.bfloat16).astype(np.float32)
        u = a.commit({"w": x}, base=s0.id)  # a lossless fine-tune of it
        v = a.commit({"w": x.copy()}, lossy="bf16")  # the same weights released as bf16: restores to them
        for fraction in (1.0, 1 / 4):
            g, _ = storage_graph(a, fraction=fraction)
            assert g.edge(u.id, v.id).storage == pytest.approx(v.stored_bytes, rel=0.3)
        g, _ = storage_graph(a, fraction=1.0)
        plan = plan_all(g, 50.0)["pas"]
        assert plan.parent[v.id] == ROOT and plan.storage <= s0.stored_bytes + u.stored_bytes + v.stored_bytes


def test_measuring_an_archive_reads_each_manifest_a_bounded_number_of_times(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each measured pair is committed to a scratch archive and discarded again; a discard that looked for the
    scratch snapshot's children read every manifest there, which made planning quadratic in snapshots."""
    from gpupas.store.archive import ArchiveStore

    reads = {"n": 0}
    read = ArchiveStore.read_manifest

    def counting(self: ArchiveStore, sid: str) -> object:
        reads["n"] += 1
        return read(self, sid)

    monkeypatch.setattr(ArchiveStore, "read_manifest", counting)
    per_snapshot = []
    for n in (8, 32):
        w = np.zeros(64, np.float32)
        with gpupas.create_archive(tmp_path / f"a{n}") as a:
            base = None
            for _ in range(n):
                w = w + np.float32(1e-3)
                base = a.commit({"w": w}, base=base).id
            reads["n"] = 0
            storage_graph(a)
        per_snapshot.append(reads["n"] / n)
    assert per_snapshot[1] < 1.5 * per_snapshot[0], per_snapshot  # linear: the same per snapshot at 32 as at 8


def test_a_plan_removes_the_scratch_archives_killed_plans_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """A plan codes its sampled deltas in a temporary archive; a SIGKILLed `gpupas plan` (or compaction) left it
    in the temporary folder for good. The next plan removes those untouched for an hour, not a running one's."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    old = time.time() - 2 * 3600
    left, running = tmp_path / "tmp" / "gpupas-plan-killed", tmp_path / "tmp" / "gpupas-plan-running"
    for d in (left, running):
        (d / "a").mkdir(parents=True)
        (d / "a" / "zarr.json").write_text("{}")
        os.utime(d / "a" / "zarr.json", (old, old))
        os.utime(d / "a", (old, old))
        os.utime(d, (old, old))
    (running / "a" / "zarr.json").write_text("{} ")  # written just now
    with gpupas.create_archive(tmp_path / "arc") as a:
        s0 = a.commit({"w": np.zeros(64, np.float32)}).id
        a.commit({"w": np.ones(64, np.float32)}, base=s0)
        storage_graph(a)
    assert not left.exists() and running.exists()
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["gpupas-plan-running"]  # its own: removed


def test_a_plan_leaves_the_users_files_that_share_its_scratch_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    """Only a plan's scratch folders (a folder holding its archive ``a``) are a killed plan's leftovers: a file or
    folder of the user's named gpupas-plan-* in the temporary folder stays, however old."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp" / "gpupas-plan-notes").mkdir(parents=True)
    mine = [tmp_path / "tmp" / "gpupas-plan-notes.md", tmp_path / "tmp" / "gpupas-plan-notes" / "todo.md"]
    old = time.time() - 2 * 3600
    for p in mine:
        p.write_text("mine")
        os.utime(p, (old, old))
    os.utime(tmp_path / "tmp" / "gpupas-plan-notes", (old, old))
    with gpupas.create_archive(tmp_path / "arc") as a:
        s0 = a.commit({"w": np.zeros(64, np.float32)}).id
        a.commit({"w": np.ones(64, np.float32)}, base=s0)
        storage_graph(a)
    assert all(p.read_text() == "mine" for p in mine)


def test_a_plan_measuring_for_over_an_hour_keeps_its_scratch_archive(tmp_path: Path) -> None:
    """Each measured pair is committed to the scratch archive and discarded: its files come and go, the files
    left are those of the first commits. A plan starting beside one that has measured for over an hour must not
    take its scratch archive for a killed plan's (only its folders' times are fresh)."""
    import tempfile

    from gpupas.outputs import remove_if_stale

    scratch = Path(tempfile.mkdtemp(prefix="gpupas-plan-", dir=tmp_path))
    old = time.time() - 2 * 3600
    with gpupas.create_archive(scratch / "a", durable=False) as s:
        w0 = s.commit({"w": np.zeros(4096, np.float32)}, snapshot="w0").id
        for d, dirs, files in os.walk(scratch):  # the first commits: two hours ago
            for n in (*dirs, *files):
                os.utime(os.path.join(d, n), (old, old), follow_symlinks=False)
        os.utime(scratch, (old, old))
        for k in range(2):  # the pairs measured just now
            s.discard(s.commit({"w": np.ones(4096, np.float32)}, base=w0, snapshot=f"d{k}").id, force=True)
        remove_if_stale(scratch)
        assert scratch.exists()
        assert s.commit({"w": np.ones(4096, np.float32)}, base=w0, snapshot="d2").id == "d2"


def test_plan_maps_to_revisions_parents_first(tmp_path: Path) -> None:
    run_archive(tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        s = a.snapshots()
        target = {x: a.manifest(x).base for x in s}
        target[s[1]] = None
        target[s[2]] = s[0]
        target[s[4]] = s[1]
        chs = changes(target, a.manifest)
        order = [c.snapshot for c in chs]
        assert set(order) >= {s[1], s[2], s[4]}
        assert order.index(s[1]) < order.index(s[4])
        assert next(c for c in chs if c.snapshot == s[4]).after == (s[1],)
        with pytest.raises(ValueError, match="loop"):
            changes({s[0]: s[1], s[1]: s[0]}, a.manifest)


def test_cli_plan_and_dry_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import gpupas.cli.jobs  # registers plan and compact
    from gpupas.cli.app import app

    run_archive(tmp_path / "a")
    runner = CliRunner()
    res = runner.invoke(app, ["-A", str(tmp_path / "a"), "plan", "--alpha", "3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc["plans"]) >= {"materialized", "mst", "spt", "last", "pas-mt", "pas-pt"}
    assert all(not p["violations"] for k, p in doc["plans"].items() if k not in ("mst", "materialized"))
    assert doc["current"]["measured"] and not doc["plans"]["materialized"]["measured"]  # (whole forms sampled)
    text = runner.invoke(app, ["-A", str(tmp_path / "a"), "plan", "--alpha", "3"]).stdout
    stored = {ln.split("│")[1].strip(): ln.split("│")[2].strip() for ln in text.splitlines()
              if ln.count("│") > 3 and ln.split("│")[1].strip().split(" ")[0] in doc["plans"]}
    assert stored and all(v.endswith("~") != doc["plans"][k.split(" ")[0]]["measured"] for k, v in stored.items()), (
        stored, text)  # a sampled estimate says so, in the plans table as in the rows
    (tmp_path / "plan.json").write_text(res.stdout)
    res = runner.invoke(app, ["-A", str(tmp_path / "a"), "compact", "--plan", str(tmp_path / "plan.json"),
                              "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "nothing was changed" in res.stdout
    res = runner.invoke(app, ["-A", str(tmp_path / "a"), "compact", "--plan", str(tmp_path / "plan.json"),
                              "--scheduler", "sync", "--json"])
    assert res.exit_code == 0, res.output
    with gpupas.open_archive(tmp_path / "a") as a:
        assert {s: a.manifest(s).base for s in a.snapshots()} == doc["target"]
    res = runner.invoke(app, ["-A", str(tmp_path / "a"), "plan", "--alpha", "0.5"])
    assert res.exit_code == 2 and "at least 1" in res.output


def test_default_compaction_stores_no_more_and_restores_nothing_slower(tmp_path: Path) -> None:
    """Without an alpha a plan budgets each snapshot its recreation now: it never grows the archive
    (at alpha 2 this archive would be stored whole, more than twice its size) and never slows a restore."""
    from typer.testing import CliRunner

    import gpupas.cli.jobs  # registers plan and compact
    from gpupas.cli.app import app
    from gpupas.plan.archive import plan_archive

    run_archive(tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        tight = plan_archive(a, 2.0)
        kept = plan_archive(a, None, no_slower=True)
        assert tight.plan.storage > tight.current.storage  # what the old default carried out
        assert kept.plan.storage <= kept.current.storage and not kept.plan.violations
        assert all(kept.plan.recreation[g] <= kept.current.recreation[g] * (1 + 1e-9) for g in kept.current.recreation)
        before = {s: a.manifest(s).stored_bytes for s in a.snapshots()}
    runner = CliRunner()
    res = runner.invoke(app, ["-A", str(tmp_path / "a"), "plan", "--json"])
    doc = json.loads(res.stdout)
    plans = doc["plans"]
    assert plans["pas"]["storage"] == plans["pas-mt" if plans["pas"] == plans["pas-mt"] else "pas-pt"]["storage"]
    if doc["chosen"] == "current":  # the table agrees with the note: measured, no plan stores less
        assert min(plans["pas-mt"]["storage"], plans["pas-pt"]["storage"]) >= plans["current"]["storage"] or any(
            plans[k]["violations"] for k in ("pas-mt", "pas-pt"))
    assert runner.invoke(app, ["-A", str(tmp_path / "a"), "plan", "--alpha", "inf", "--json"]).exit_code == 0
    res = runner.invoke(app, ["-A", str(tmp_path / "a"), "compact", "--scheduler", "sync"])
    assert res.exit_code == 0, res.output
    with gpupas.open_archive(tmp_path / "a") as a:
        assert sum(a.manifest(s).stored_bytes for s in a.snapshots()) <= sum(before.values())
    for bad, what in ((["--alpha", "nan"], "at least 1"), (["--planner", "foo"], "planner must be"),
                      (["--pair", "nosuch:x"], "no snapshot"), (["--workers", "0"], "at least one worker"),
                      (["--scheduler", "bogus"], "scheduler 'bogus'"), (["--codec", "zstdd"], "not a chunk codec")):
        cmd = "plan" if bad[0] in ("--planner", "--pair") else "compact"
        res = runner.invoke(app, ["-A", str(tmp_path / "a"), cmd, *bad, "--dry-run"][: 5 if cmd == "plan" else 6])
        assert res.exit_code in (1, 2) and what in res.output, (bad, res.output)


def test_problem_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="scheme"):
        Problem(StorageGraph(), "serial")


def test_twin_runs_are_candidates_and_a_plan_stores_one_on_the_other(tmp_path: Path) -> None:
    """Two runs with nothing in their lineage to pair them (a rerun, a sweep's sibling): the n-th checkpoint of
    one is a candidate base of the other's, so a plan finds that the second run costs almost nothing."""
    from gpupas.plan.archive import plan_archive
    from gpupas.plan.measure import candidate_pairs

    rng = np.random.default_rng(3)
    ckpts = [{"w": (rng.standard_normal(30_000) * 0.05).astype(np.float32), "b": np.zeros(64, np.float32)}]
    for _ in range(2):
        ckpts.append({k: v + (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in ckpts[-1].items()})
    with gpupas.create_repository(tmp_path / "a") as repo:
        first, rerun = repo.commit("run", ckpts), repo.commit("rerun", ckpts)  # the same bits, no lineage
        other = repo.commit("other", [{"w": np.ones(30_000, np.float32)}])  # another model: no twin of anything
        a, b = ([s["id"] for s in v.snapshots] for v in (first, rerun))
        cands = candidate_pairs(repo.archive)
        assert {(a[i], b[i]) for i in range(3)} <= cands and {(b[i], a[i]) for i in range(3)} <= cands
        assert not {p for p in cands if other.latest in p}
        p = plan_archive(repo.archive, alpha=4.0)
        assert sum(p.target[x] in a for x in b) >= 2  # stored whole and deltas on each other: now on the twins
        assert p.plan.storage < 0.75 * p.current.storage


def test_a_nan_alpha_or_budget_is_refused_not_read_as_no_budget(tmp_path: Path) -> None:
    """NaN compares false with every cost: taken as a budget it dropped them all, so ``compact_archive(alpha=nan)``
    carried out the least-storage plan (longest chains) and a NaN ``--budget`` was silently no budget."""
    from typer.testing import CliRunner

    import gpupas.cli.jobs  # registers plan and compact
    from gpupas.cli.app import app
    from gpupas.errors import InvalidInputError
    from gpupas.jobs.compact import compact_archive
    from gpupas.plan.archive import plan_archive

    rng = np.random.default_rng(0)
    w = rng.standard_normal(20_000).astype(np.float32)
    with gpupas.create_archive(tmp_path / "a") as a:
        s0 = a.commit({"w": w}, snapshot="s0").id
        a.commit({"w": w + 1e-3}, snapshot="s1")  # whole: no base given
        with pytest.raises(InvalidInputError, match="alpha must be at least 1"):
            plan_archive(a, float("nan"))
        with pytest.raises(InvalidInputError, match=r"s0.*NaN"):
            plan_archive(a, None, budgets={s0: float("nan")})
        with pytest.raises(InvalidInputError, match=r"s0 is -1 s: give seconds, at least 0"):
            plan_archive(a, None, budgets={s0: -1})
    with pytest.raises(InvalidInputError, match="alpha must be at least 1"):
        compact_archive(str(tmp_path / "a"), alpha=float("nan"), scheduler="sync")
    with gpupas.open_archive(tmp_path / "a") as a:
        assert [a.manifest(s).base for s in ("s0", "s1")] == [None, None]  # nothing was changed
    res = CliRunner().invoke(app, ["-A", str(tmp_path / "a"), "plan", "--alpha", "2", "--budget", "s1=nan"])
    assert res.exit_code in (1, 2) and "NaN" in res.output, res.output


def test_default_compaction_counts_the_snapshots_whose_pred_base_it_moves(tmp_path: Path) -> None:
    """s2 is a 'pred' delta on s1 extrapolating from s0 (its grand); t1 is a near twin of s1. Re-basing s1 onto
    t1 stores less for s1, and s2 keeps its base, but its grand becomes t1: compact re-encodes s2, which loses
    its extrapolation and doubles. The plan counted s2 at its 'pred' size, so the default (no slower) compaction
    stored more than before."""
    from gpupas.jobs.compact import compact_archive
    from gpupas.plan.archive import plan_archive

    _pred_chain_beside_a_near_twin(tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        assert a.manifest("s2").grand == "s0" and a.manifest("s2").has_pred
        before = sum(a.manifest(x).stored_bytes for x in a.snapshots())
        claimed = plan_archive(a, None, no_slower=True).plan.storage
    out = compact_archive(str(tmp_path / "a"), alpha=None, no_slower=True, scheduler="sync")
    assert out.stored_after <= before
    assert out.stored_after <= claimed * (1 + 1e-9)  # the plan's claim holds once carried out


@pytest.mark.parametrize("alpha", [2.5, 3.0])
def test_a_plan_at_an_alpha_counts_the_snapshots_compact_reencodes(tmp_path: Path, alpha: float) -> None:
    """As above, at an alpha: s1 is stored whole (s2 on s1 on s0 is too slow), s2 stays on s1 but loses its grand
    s0, so compact re-encodes s2 as a plain delta. Only the no-slower plan counted that; a plan at an alpha
    claimed s2 at its 'pred' size, in its total and its row, and compact then stored more than the plan said."""
    from gpupas.jobs.compact import compact_archive
    from gpupas.plan.archive import plan_archive

    _pred_chain_beside_a_near_twin(tmp_path / "a")
    with gpupas.open_archive(tmp_path / "a") as a:
        planned = plan_archive(a, alpha, fraction=1.0)
        assert planned.target["s1"] is None and planned.target["s2"] == "s1"  # s2's grand goes: re-encoded
        rows = {r["snapshot"]: r["stored"] for r in planned.rows()}
    out = compact_archive(str(tmp_path / "a"), target=planned.target, scheduler="sync")
    assert out.stored_after == pytest.approx(planned.plan.storage, rel=1e-9)
    with gpupas.open_archive(tmp_path / "a") as a:
        assert {x: a.manifest(x).stored_bytes for x in a.snapshots()} == pytest.approx(rows, rel=1e-9)


def test_a_chain_past_the_limit_is_said_in_links_not_seconds() -> None:
    """A plan whose chain is deeper than max_chain says so in links (it printed "recreation 2 s > budget 1 s")."""
    g = _chain_abc()
    (v,) = [v for v in plan_all(g, None, max_depth=1)["mst"].violations if str(v.group).startswith("chain")]
    assert str(v) == "chain of 'c': 2 links > at most 1 (1 snapshot(s) deeper than 1 links)", str(v)


def _pred_chain_beside_a_near_twin(path: Path) -> None:
    """s0 <- s1 <- s2 (s2 'pred', extrapolating from s0), and t1 whole, a near twin of s1."""
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    drift = (rng.standard_normal(w0.shape) * 1e-3).astype(np.float32)
    s = [{"w": (w0 + k * drift).astype(np.float32)} for k in range(3)]
    twin = {"w": (s[1]["w"] + rng.standard_normal(w0.shape).astype(np.float32) * 1e-6).astype(np.float32)}
    with gpupas.create_archive(path) as a:
        a.commit(s[0], snapshot="s0")
        a.commit(twin, snapshot="t1")
        a.commit(s[1], snapshot="s1", base="s0")
        a.commit(s[2], snapshot="s2", base="s1")


def test_the_current_layout_counts_the_snapshots_compact_reencodes_off_a_dropped_base(tmp_path: Path) -> None:
    """s0 <- s1 <- s2 <- s3 (s3 'pred', extrapolating from s1); s1 dropped. The layout stays, but s2 is stored
    whole so gc can free s1, and s3 loses its grand: compact re-encodes it. The plan counted s3 at its 'pred'
    size in "current" (chosen) and in some plans of the same layout, so what compact stored was more than the
    plan said, and plans of one layout disagreed."""
    from gpupas.jobs.compact import compact_archive
    from gpupas.plan.archive import plan_archive

    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    drift = (rng.standard_normal(w0.shape) * 1e-3).astype(np.float32)
    with gpupas.create_repository(tmp_path / "a") as repo:
        v = repo.commit("run", {"w": w0})
        for k in (1, 2, 3):
            repo.add_snapshot(v.id, {"w": (w0 + k * drift).astype(np.float32)})
        s = [x["id"] for x in repo.version(v.id).snapshots]
        assert repo.archive.manifest(s[3]).grand == s[1]
        repo.drop_snapshots(v.id, [2])
    with gpupas.open_archive(tmp_path / "a") as a:
        planned = plan_archive(a, None, no_slower=True)
        rows = {r["snapshot"]: r["stored"] for r in planned.rows()}
        assert planned.chosen == "current" and planned.target[s[2]] is None
        by_layout: dict[tuple[str, ...], set[float]] = {}
        for p in [*planned.plans.values(), planned.current]:
            by_layout.setdefault(tuple(sorted(map(str, p.parent.items()))), set()).add(p.storage)
        assert all(len(sizes) == 1 for sizes in by_layout.values()), by_layout
    out = compact_archive(str(tmp_path / "a"), alpha=None, no_slower=True, scheduler="sync")
    with gpupas.open_archive(tmp_path / "a") as a:
        kept = {x: a.manifest(x).stored_bytes for x in (s[0], s[2], s[3])}
    assert out.stored_after - out.stored_unkept == pytest.approx(planned.plan.storage, rel=1e-9)
    assert kept == pytest.approx(rows, rel=1e-9)
