"""The SQLite catalog (a cache rebuilt from the archive) and DQL select queries served from it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupas.catalog import FILENAME, _like
from gpupas.errors import InvalidInputError
from gpupas.format.sealed import seal
from gpupas.query import compile_query, tokenize
from gpupas.versions.repository import Repository, create_repository, open_repository


def net(*layers: tuple[str, str], extra_edges: tuple[tuple[int, int], ...] = ()) -> dict:
    """A network dict: a chain of (name, type) layers."""
    nodes = [{"id": i, "name": n, "type": t, "attrs": {}} for i, (n, t) in enumerate(layers)]
    return {"source": "given", "nodes": nodes, "edges": [[i, i + 1] for i in range(len(layers) - 1)]
            + [list(e) for e in extra_edges]}


CNN_MAX = net(("x", "input"), ("conv1", "Conv2d"), ("relu1", "ReLU"), ("pool1", "MaxPool2d"), ("conv2", "Conv2d"),
              ("drop", "Dropout"), ("pool2", "AvgPool2d"), ("fc", "Linear"), ("output", "output"))
CNN_AVG = net(("conv1", "Conv2d"), ("relu", "relu"), ("avg_pool2d", "avg_pool2d"), ("conv4", "Conv2d"),
              ("max_pool2d", "max_pool2d"), ("fc", "Linear"))
MLP = net(("fc1", "Linear"), ("act", "GELU"), ("fc2", "Linear"), ("bn", "BatchNorm1d"))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = create_repository(tmp_path / "arc")
    w = {"w": np.zeros(4, np.float32)}
    r.commit("cnn_max", w, network=CNN_MAX, hyperparameters={"lr": 0.001, "opt": {"name": "adam"}, "aug": True},
             metrics={"accuracy": [[1, 0.5], [2, 0.93]], "loss": [[1, 1.0], [2, 0.2]]}, author="ana")
    r.commit("cnn_avg", w, network=CNN_AVG, parents=[1], hyperparameters={"lr": 0.05, "opt": {"name": "sgd"}},
             metrics={"accuracy": [[1, 0.95], [2, 0.85]]}, author="bo", message="avg pooling first")
    r.commit("mlp-1", w, network=MLP, hyperparameters={"lr": 0.01, "opt": {"name": "sgd"}, "layers": [64, 32]},
             metrics={"loss": [[1, 0.7]]})
    r.commit("cnnXmax", w, network=CNN_MAX, parents=[1, 2], hyperparameters={"lr": "auto"})
    r.tag("prod", 2)
    yield r
    r.close()


def ids(repo: Repository, q: str) -> list[int]:
    return [row["id"] for row in repo.query(q)]


@pytest.mark.parametrize(("q", "want"), [
    ("select m", [1, 2, 3, 4]),
    ('select m where m.name like "cnn_%"', [1, 2, 4]),  # SQL LIKE: _ is any one character
    ('select m where m.name like "cnn\\_%"', [1, 2, 4]),  # the string's backslash is gone before LIKE sees it
    ('select m where m.name like "cnn!_%" escape "!"', [1, 2]),  # ESCAPE: _ as itself
    ('select m where m.name like "cnn!_%" ESCAPE "!" and m.name not like "%!_avg" escape "!"', [1]),
    ('select m where m.hp.opt.name like "s!%d" escape "!"', []),
    ('select m where m.tag like "p!!od" escape "!"', []),
    ('select m where m.name not like "cnn%"', [3]),
    ('select m where m.name = "mlp-1"', [3]),
    ('select m where m.created > "2020-01-01" and m.created < "2999-01-01"', [1, 2, 3, 4]),
    ('select m where m.created > "2999-01-01"', []),
    ("select m where m.hp.lr < 0.01", [1]),
    ("select m where m.hp.lr <= 0.01", [1, 3]),
    ('select m where m.hp.lr = "auto"', [4]),
    ('select m where m.hp.opt.name = "sgd"', [2, 3]),
    ('select m where m.hp["opt.name"] != "sgd"', [1]),
    ("select m where m.hp.aug = true", [1]),
    ("select m where m.metric.accuracy >= 0.9", [1]),  # the last value
    ("select m where m.metric.accuracy.max >= 0.9", [1, 2]),
    ("select m where m.metric.loss.min < 0.5 or m.metric.accuracy.count = 2", [1, 2]),
    ('select m where m["conv[1-3]"].next has POOL("MAX")', [1, 4]),  # through relu
    ('select m where m["conv[1-3]"].next has POOL("AVG")', [1, 2, 4]),  # through dropout
    ('select m where m["conv4"].next has POOL("max")', [2]),
    ('select m where m["conv[1,3,5]"].next has RELU', [1, 2, 4]),
    ('select m where m["pool.*"].prev has CONV', [1, 4]),
    ('select m where m["fc2"].next has NORM("batch")', [3]),
    ('select m where m["fc1"].next has NORM("batch")', []),
    ('select m where m["fc1"].next has FC', [3]),  # through GELU
    ('select m where m has TYPE("MaxPool2d")', [1, 4]),
    ('select m where m has POOL and not m has POOL("AVG")', []),
    ('select m where m["conv1"]', [1, 2, 4]),
    ('select m where m["conv"]', []),  # whole-name match
    ('select m where m["bn"] has NORM', [3]),
    ("select m where m.parent = 1", [2, 4]),
    ('select m where m.tag = "prod"', [2]),
    ('select m where m.author = "bo" or (m.snapshots = 1 and m.id > 3)', [2, 4]),
    ('SELECT m WHERE m.message LIKE "%pooling%"', [2]),
    ('select m where m.tag like "pr%"', [2]),
    ('select m where m.tag not like "x%"', [2]),  # some tag that is not like it, as m.tag != "x"
    ("select m order by m.name desc limit 2", [3, 1]),  # "_" sorts after "X"
    ("select v where v.id != 2 order by v.id desc", [4, 3, 1]),
    ("select m order by m.metric.accuracy", [2, 1, 3, 4]),  # the last value; versions without it last
    ("select m order by m.metric.accuracy.max desc", [2, 1, 3, 4]),
    ("select m order by m.metric.accuracy.max asc limit 1", [1]),
    ("select m order by m.metric.loss", [1, 3, 2, 4]),
    ("select m order by m.hp.lr desc", [4, 2, 3, 1]),  # numbers sort below strings (SQLite's order)
    ('select m where m.hp.lr < 1 order by m.hp.lr', [1, 3, 2]),
    ('select m order by m.hp["opt.name"] desc', [2, 3, 1, 4]),
    ("select m order by m.hp.aug", [1, 2, 3, 4]),  # only 1 has it
    ("select m where m.id < 99999999999999999999", [1, 2, 3, 4]),  # past SQLite's integers: a number still
    ("select m where m.hp.limit = 1 or m.hp.order = 1", []),  # a keyword as a key
])
def test_select(repo: Repository, q: str, want: list[int]) -> None:
    assert ids(repo, q) == want


@pytest.mark.parametrize(("q", "msg"), [
    ("", "empty statement"),
    ("delete m", "expected select"),
    ("select m where", "expected 'm'"),
    ("select m where x.name = 1", "unknown variable 'x'"),
    ("select m where m.color = 1", "unknown field 'color'"),
    ('select m where m["conv("] has CONV', "bad layer pattern"),
    ('select m where m["a"].next has WIDGET', "unknown layer template 'WIDGET'"),
    ('select m where m["a"].next', "expected HAS"),
    ('select m where m["a"].sideways has CONV', ".next or .prev"),
    ('select m where m.name = "a" "b"', "unexpected text"),
    ("select m where m.name = ", "expected a value"),
    ('select m where m.metric.loss < "low"', "metrics compare with numbers"),
    ("select m where m.id like 3", "m.id is a number"),
    ("select m where m.parent like 1", "m.parent is a number"),
    ('select m where m.parent like "1"', "m.parent is a number"),
    ('select m where m.snapshots like "1%"', "m.snapshots is a number"),
    ("select m where m.tag like 1", "LIKE needs a quoted pattern"),
    ('select m where m.name like "x" escape "!!"', "ESCAPE takes one quoted character"),
    ('select m where m.name like "x" escape 1', "ESCAPE takes one quoted character"),
    ('select m where m.name = "x" escape "!"', "unexpected text"),
    ("select m where m.tag not like 1", "LIKE needs a quoted pattern"),
    ('select m where m.parent = "1"', "m.parent compares with numbers"),
    ("select m where m.parent = true", "m.parent compares with numbers"),
    ('select m where m.id > "2"', "m.id compares with numbers"),
    ("select m where m.name = 1", "m.name compares with quoted strings"),
    ("select m where m.tag = 1", "m.tag compares with quoted strings"),
    ("select m where m.author = false", "m.author compares with quoted strings"),
    ("select m limit -1", "LIMIT takes a whole number"),
    ("select m order by m.color", "cannot order by 'color'"),
    ("select m limit 99999999999999999999", "LIMIT takes a whole number"),
    ("select m where m.name = 'a' ; drop table versions", "cannot read"),
    ("select m where m.name = @", "cannot read"),
    ('select m where m.name = "abc', 'string opened at position 24 is not closed: end it with "'),
    ("select m where m.hp.lr > - 1", "query --help"),
])
def test_bad_statements_say_where(repo: Repository, q: str, msg: str) -> None:
    with pytest.raises(InvalidInputError, match="DQL") as exc:
        repo.query(q)
    assert msg in str(exc.value)


def test_values_are_parameters_not_sql(repo: Repository) -> None:
    sql, params = compile_query("select m where m.name = \"x' OR 1=1 --\" and m.hp.lr > 1e-3")
    assert "OR 1=1" not in sql and params == ["x' OR 1=1 --", "lr", 0.001]
    assert ids(repo, "select m where m.name = \"x' OR 1=1 --\"") == []
    assert [t.kind for t in tokenize('m["a\\"b"]')] == ["name", "op", "str", "op", "end"]


def _dump(repo: Repository) -> dict:
    return repo.catalog().dump()


def test_rebuilt_catalog_equals_the_live_one(repo: Repository) -> None:
    repo.add_snapshot(3, {"w": np.ones(4, np.float32)}, step=2, metrics={"loss": [[2, 0.5]]}, best=True)
    repo.tag("old", 1)
    repo.tag("prod", 3, force=True)
    repo.untag("old")
    repo.copy(2, "copy-of-2")
    live = _dump(repo)
    assert live["versions"] and live["layers"] and live["tensors"] and live["metric_summary"]
    counts = repo.reindex()
    assert counts["versions"] == 5 and counts["tags"] == 1
    assert _dump(repo) == live
    # and a catalog built from scratch in another file, from the archive alone
    (repo.root / FILENAME).rename(repo.root / "old.sqlite")
    for suffix in ("-wal", "-shm"):
        (repo.root / f"{FILENAME}{suffix}").unlink(missing_ok=True)
    with open_repository(repo.root) as fresh:
        assert _dump(fresh) == live


def test_a_write_indexes_what_it_wrote_without_listing_the_archive(repo: Repository) -> None:
    """Commits, appends, copies and untags update the catalog from the records they wrote: one at the
    thousandth version costs what one at the first does. Changes by others are found by the next read."""
    listed = []
    real = repo.records.fingerprints
    repo.records.fingerprints = lambda: listed.append(1) or real()  # type: ignore[method-assign]
    with open_repository(repo.root) as other:
        other.commit("other", {"w": np.ones(2, np.float32)}, hyperparameters={"lr": 0.7})  # not seen yet
    v = repo.commit("more", {"w": np.full(4, 2, np.float32)}, parents=[1], hyperparameters={"lr": 0.3},
                    metrics={"loss": [[1, 0.4]]})
    repo.add_snapshot(v.id, {"w": np.full(4, 3, np.float32)}, metrics={"loss": [[2, 0.3]]})
    repo.copy(v.id, "its-copy")
    repo.untag("prod")
    assert listed == []
    assert ids(repo, "select m where m.hp.lr >= 0.3") == [5, 6, 7]  # a read catches up with the other writer
    assert ids(repo, "select m where m.metric.loss = 0.3") == [6] and repo.tags() == {}
    assert listed
    live = _dump(repo)
    repo.reindex()
    assert _dump(repo) == live


def test_catalog_catches_up_with_other_writers(repo: Repository) -> None:
    with open_repository(repo.root) as other:
        other.commit("late", {"w": np.ones(2, np.float32)}, hyperparameters={"lr": 1e-5})
        other.tag("late-tag", "late")
    assert ids(repo, "select m where m.hp.lr < 0.0001") == [5]
    assert repo.tags()["late-tag"] == 5
    # a record rewritten behind the catalog's back (another process, no catalog update) is re-read
    rec = repo.version(5).to_dict()
    rec["hyperparameters"]["lr"] = 0.5
    repo.records.store.update("versions/5.json", lambda _old: seal(rec))
    assert ids(repo, "select m where m.hp.lr = 0.5") == [5]
    assert repo.catalog().is_fresh()


def test_missing_or_damaged_catalog_is_rebuilt(repo: Repository) -> None:
    live = _dump(repo)
    root = repo.root
    repo.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / FILENAME}{suffix}").unlink(missing_ok=True)
    with open_repository(root) as r:
        assert _dump(r) == live
    for suffix in ("-wal", "-shm"):
        Path(f"{root / FILENAME}{suffix}").unlink(missing_ok=True)
    (root / FILENAME).write_bytes(b"this is not a database" * 100)
    with open_repository(root) as r:
        assert _dump(r) == live
    con = sqlite3.connect(root / FILENAME)  # an older schema version
    con.execute("PRAGMA user_version=0")
    con.close()
    with open_repository(root) as r:
        assert _dump(r) == live


def test_log_is_served_from_the_catalog(repo: Repository) -> None:
    rows = repo.lineage()
    assert [(r["id"], r["parents"], r["tags"]) for r in rows] == [(1, [], []), (2, [1], ["prod"]), (3, [], []),
                                                                   (4, [1, 2], [])]


def test_a_damaged_record_does_not_take_the_catalog_down(repo: Repository) -> None:
    (repo.root / "versions" / "5.json").write_text("{not json")
    (repo.root / "versions" / "6.json").write_bytes(seal({"id": 6}))  # intact, but not a version
    assert ids(repo, "select m") == [1, 2, 3, 4]  # the others are still served
    problems = repo.verify()["problems"]
    assert any("versions/5.json" in p and "damaged" in p for p in problems)
    assert any("version record 6 is malformed" in p for p in problems)
    assert repo.commit("after", {"w": np.ones(1, np.float32)}).id == 7


def test_a_record_under_another_id_is_never_indexed_as_the_version_it_names(repo: Repository) -> None:
    versions = repo.root / "versions"
    (versions / "1.json").replace(versions / "9.json")  # version 1's record moved: it is damaged, not version 9
    assert ids(repo, "select m") == [2, 3, 4] == [v.id for v in repo.versions()]
    (versions / "9.json").unlink()
    assert ids(repo, "select m") == [2, 3, 4]  # no row of version 1 outlives every file naming it


def test_a_catalog_this_user_cannot_write_is_kept_in_the_cache_folder(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "arc"
    with create_repository(root) as r:
        r.commit("a", {"w": np.zeros(3, np.float32)})
        r.tag("t", 1)
    catalog = root / FILENAME
    catalog.chmod(0o444)  # another user's, in a folder shared for writing
    immutable = os.access(catalog, os.W_OK)  # root writes whatever the mode: make it immutable instead
    if immutable and subprocess.run(["chattr", "+i", str(catalog)], capture_output=True).returncode:
        pytest.skip("cannot make a file read-only for this user")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        with open_repository(root) as r:
            assert ids(r, "select m") == [1] and r.tags() == {"t": 1}
            r.commit("b", {"w": np.ones(3, np.float32)})
            assert ids(r, "select m") == [1, 2]
            assert r.catalog().path.parent == tmp_path / "cache" / "gpupas" / "catalogs"
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(catalog)], check=True)


@pytest.mark.parametrize("tables", [("records", "versions", "hparams"), ("hparams",)])
def test_a_catalog_with_damaged_pages_is_rebuilt(repo: Repository, tables: tuple[str, ...]) -> None:
    live, root = _dump(repo), repo.root
    want = ids(repo, "select m where m.hp.lr > 0.005")
    repo.close()
    con = sqlite3.connect(root / FILENAME)
    pages = [n for t in tables for (n,) in con.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (t,))]
    size = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray((root / FILENAME).read_bytes())
    for n in pages:  # each table's root page malformed (the sync reads records; a query the others)
        data[(n - 1) * size:n * size] = b"\x0d\xff" * (size // 2)
    (root / FILENAME).write_bytes(bytes(data))
    with open_repository(root) as r:
        assert ids(r, "select m where m.hp.lr > 0.005") == want
        assert _dump(r) == live


def _ids(repo: Repository, q: str) -> list[int]:
    return [r["id"] for r in repo.query(q)]


def test_queries_mean_what_they_say_on_types_case_time_and_metrics(tmp_path: Path) -> None:
    """Found by an outside test against a brute-force evaluation: LIKE ignored case; a boolean, a number
    and a string of the same text matched each other; `m.created` in `gpupas log`'s format compared as
    text; a diverged run's NaN loss was skipped for the last finite one, steps logged out of order were
    read by position, and `.count` skipped NaN points."""
    from gpupas.versions.inspect import diff

    w = {"w": np.zeros(4, np.float32)}
    with create_repository(tmp_path / "r") as repo:
        a = repo.commit("cnn-small", w, hyperparameters={"flag": True, "n": 1, "s": "1", "sched": None, "lr": 0.5},
                        metrics={"loss": [[0, 0.1], [1, 0.2], [2, float("nan")]], "acc": [[10, 0.9], [5, 0.1]]})
        b = repo.commit("CNN-big", w, hyperparameters={"flag": 1, "n": True, "s": 1, "sched": "null", "lr": 10},
                        metrics={"loss": [[0, 0.3]], "acc": [[1, 0.2]]})
        assert _ids(repo, 'select m where m.name like "cnn%"') == [a.id]
        assert _ids(repo, 'select m where m.name like "CNN%"') == [b.id]
        assert _ids(repo, "select m where m.hp.flag = true") == [a.id]
        assert _ids(repo, "select m where m.hp.n = 1") == [a.id]
        assert _ids(repo, 'select m where m.hp.s = "1"') == [a.id]
        assert _ids(repo, "select m where m.hp.sched = null") == [a.id]
        assert _ids(repo, 'select m where m.hp.sched = "null"') == [b.id]
        assert _ids(repo, 'select m where m.hp.lr < "2"') == []  # a string against numbers matches none
        assert _ids(repo, 'select m where m.hp.sched like "%"') == [b.id]
        assert _ids(repo, "select m where m.metric.loss < 0.5") == [b.id]  # a's last loss is NaN
        assert _ids(repo, "select m where m.metric.loss.count = 3") == [a.id]
        assert _ids(repo, "select m where m.metric.acc > 0.5") == [a.id]  # at step 10, logged first
        created = repo.version(a.id).created
        day, clock = created[:10], created[11:19]
        assert _ids(repo, f'select m where m.created > "{day} 23:59:59"') == []  # as `gpupas log` shows times
        assert _ids(repo, f'select m where m.created >= "{day} {clock}"') == [a.id, b.id]
        assert _ids(repo, f'select m where m.created < "{day}"') == []
        with pytest.raises(InvalidInputError, match="date or time"):
            repo.query('select m where m.created > "yesterday"')
        # a time on a whole second is written without microseconds: the literal of that second equals it
        assert compile_query('select m where m.created = "2026-12-06 12:00"')[1] == ["2026-12-06T12:00:00+00:00"]
        d = diff(repo, a.id, b.id, weights=False)
        assert set(d["hyperparameters"]) == {"flag", "n", "s", "sched", "lr"}  # True -> 1 is a change
        assert d["metrics"]["acc"] == [0.9, 0.2] and d["metrics"]["loss"][0] is None
        seeds = [repo.commit(f"seed{i}", w, hyperparameters={"seed": 2**53 + i}).id for i in (0, 1)]
        assert _ids(repo, f"select m where m.hp.seed = {2**53 + 1}") == [seeds[1]]  # past a double's integers
        assert _ids(repo, f"select m where m.hp.seed != {2**53 + 1}") == [seeds[0]]
        c = repo.commit("c", w, hyperparameters={"flag": True, "n": 1, "s": "1", "sched": None, "lr": 0.5, "new": None})
        assert diff(repo, a.id, c.id, weights=False)["hyperparameters"] == {"new": [None, None]}  # added, as None


def test_hyperparameter_keys_that_would_collide_are_refused(tmp_path: Path) -> None:
    """``"a.b"`` beside ``"a": {"b"}`` would be one key to queries and diffs: refused at commit, naming it;
    dotted keys alone are fine."""
    w = {"w": np.zeros(4, np.float32)}
    with create_repository(tmp_path / "r") as repo:
        with pytest.raises(InvalidInputError, match=r"'a\.b' is given twice"):
            repo.commit("x", w, hyperparameters={"a.b": 1, "a": {"b": 2}})
        v = repo.commit("x", w, hyperparameters={"opt.lr": 0.1, "opt": {"beta": 0.9}})
        assert _ids(repo, "select m where m.hp.opt.lr = 0.1 and m.hp.opt.beta = 0.9") == [v.id]


def test_numbers_past_a_double_neither_break_the_catalog_nor_the_commit(tmp_path: Path) -> None:
    """An int past a double's range (10**400) is JSON: the catalog indexes it as not finite (float("1e400") is
    not finite either) instead of failing every later sync, commit and query with OverflowError."""
    r = create_repository(tmp_path / "arc")
    w = {"w": np.zeros(4, np.float32)}
    r.commit("big", w, hyperparameters={"n": 10**400, "lr": 0.1}, metrics={"loss": [[0, 1.0], [1, 10**400]]})
    assert [row["id"] for row in r.query("select m where m.hp.lr = 0.1 and m.metric.loss.min = 1")] == [1]
    assert r.version(1).metrics["loss"] == [[0, 1.0], [1, None]]
    with pytest.raises(InvalidInputError, match="not finite"):
        r.commit("big-step", w, metrics={"loss": [[10**400, 1.0]]})
    r.close()


def test_show_table_takes_a_metrics_last_value_as_query_and_diff_do(tmp_path: Path, capsys: pytest.CaptureFixture) \
        -> None:
    """`gpupas show`'s metrics table: last = the value at the highest step ("-" where that is NaN: a diverged
    run), the steps' range from lowest to highest, whatever order the points were logged in."""
    from gpupas.cli import render

    r = create_repository(tmp_path / "arc")
    r.commit("a", {"w": np.zeros(4, np.float32)},
             metrics={"loss": [[1, 0.5], [2, float("nan")]], "acc": [[3, 0.9], [1, 0.1], [2, 0.5]]})
    assert [x["id"] for x in r.query("select m where m.metric.acc >= 0.9 and m.metric.loss.count = 2")] == [1]
    assert r.diff(1, 1, weights=False)["metrics"] == {"acc": [0.9, 0.9], "loss": [None, None]}
    d = r.show(1)
    r.close()
    capsys.readouterr()
    render.show(render.Output(), d, tensors=False, network=False)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│ ") and line.count("│") == 8}
    assert rows["loss"] == ["2", "1", "2", "-", "0.5", "0.5"]
    assert rows["acc"] == ["3", "1", "3", "0.9", "0.1", "0.9"]


def test_a_quoted_metric_name_is_the_whole_name(tmp_path: Path) -> None:
    """m.metric["grad_norm.max"] is the metric of that name (the quotes say where the name ends), not the highest
    value of a metric "grad_norm"; a .max/.min/.count after the quotes is the summary."""
    r = create_repository(tmp_path / "arc")
    r.commit("a", {"w": np.zeros(4, np.float32)}, metrics={"grad_norm.max": [[0, 50.0], [1, 20.0]]})
    r.commit("b", {"w": np.zeros(4, np.float32)}, metrics={"grad_norm": [[0, 50.0], [1, 5.0]]})
    assert ids(r, 'select m where m.metric["grad_norm.max"] > 10') == [1]
    assert ids(r, 'select m where m.metric["grad_norm.max"].max > 40') == [1]
    assert ids(r, 'select m where m.metric.grad_norm.max > 40') == [2]
    assert ids(r, 'select m where m.metric["grad_norm"].max > 40') == [2]
    assert ids(r, 'select m order by m.metric["grad_norm.max"] desc limit 1') == [1]
    r.close()


@pytest.mark.parametrize("ref", ["²", "1²", "1" * 5000])
def test_references_that_only_look_like_ids_fail_as_input_errors(repo: Repository, ref: str) -> None:
    """"²" is a digit to str.isdigit, not to int(); 5000 digits are past int()'s limit: a version or snapshot
    reference such as these is not found (or not allowed), never a ValueError (an internal error at the CLI)."""
    from gpupas.errors import GpupasError, VersionNotFoundError

    with pytest.raises((InvalidInputError, VersionNotFoundError)):
        repo.resolve(ref)
    with pytest.raises(GpupasError):
        repo.version(1).snapshot(ref)
    from gpupas.versions.model import natural_key

    assert natural_key(f"step-{ref[:3]}.pt")


@pytest.mark.parametrize("metric", ["Train/Loss", "val_LOSS", "Error", "Perplexity"])
def test_best_by_a_capitalized_loss_picks_the_lowest(metric: str) -> None:
    """best_by="Train/Loss" (TensorBoard's habit) is named like a loss: lowest-best, as "loss" is."""
    from gpupas.versions.metrics import best_rule, pick_best

    assert best_rule(metric) == (metric, 1)
    entries = [{"id": "a", "step": 1}, {"id": "b", "step": 2}]
    assert pick_best(entries, {metric: [[1, 0.2], [2, 0.9]]}, None, metric) == "a"


def test_query_literals_past_a_double_or_int_digits_are_numbers_not_internal_errors(tmp_path: Path) -> None:
    """A DQL number past a double's range (10**400) or past int()'s 4300 digits reads as inf, as 1e400 does: it
    raised OverflowError / ValueError from the tokenizer (an internal error at the CLI)."""
    for lit in ("1" + "0" * 400, "-" + "9" * 5000, "1e400"):
        tok = tokenize(f"select m where m.hp.n = {lit}")[-2]
        assert tok.kind == "num" and tok.value in (float("inf"), float("-inf")), lit
    assert tokenize("select m where m.hp.n = 9223372036854775808")[-2].value == 2.0**63
    r = create_repository(tmp_path / "arc")
    r.commit("big", {"w": np.zeros(4, np.float32)}, hyperparameters={"n": 10**400})
    assert r.query("select m where m.hp.n > 1" + "0" * 400) == []
    r.close()


@pytest.mark.parametrize("pattern", ["(" * 1000 + ")" * 1000, "a{4294967296}", "(?a)(?u)a"])
def test_a_layer_pattern_python_cannot_compile_is_bad_input(pattern: str) -> None:
    """re.compile raises RecursionError (deep groups), OverflowError (a huge repeat) or ValueError (incompatible
    flags) besides re.error: they escaped the parser as internal errors."""
    with pytest.raises(InvalidInputError, match="bad layer pattern"):
        compile_query(f'select m where m["{pattern}"] has CONV')


def test_deep_nesting_and_long_chains_are_answered_or_refused_as_input(repo: Repository) -> None:
    """100 parentheses or NOTs raised SQLite's OperationalError ("parser stack overflow"), 1000 a RecursionError,
    and a chain of 1000 ANDs "Expression tree is too large": internal errors. Chains now nest as a balanced tree."""
    for q in ["(" * 100 + "m.id = 1" + ")" * 100, "not " * 1000 + "m.id = 1",
              "m.id = 1" + "".join(f" or (m.id = 2 or {'m.id = 3 or ' * 99}" for _ in range(39)) + ")" * 39]:
        with pytest.raises(InvalidInputError, match="DQL"):
            repo.query("select m where " + q)
    assert ids(repo, "select m where " + "(" * 40 + "m.id = 1" + ")" * 40) == [1]
    assert ids(repo, "select m where " + " and ".join(["m.id = 2"] * 2000)) == [2]
    assert ids(repo, "select m where " + " or ".join(f"m.id = {i}" for i in range(3, 2000))) == [3, 4]
    assert ids(repo, "select m where m.id = 1 or m.id = 2 and m.id = 3 or not (m.id < 4)") == [1, 4]


def test_like_takes_linear_time_on_many_percent_signs(repo: Repository) -> None:
    """LIKE was one regular expression, ``.*a.*a.*...b``: it backtracked exponentially, so seven ``%a`` over a
    version name of 60 a's took seconds and eight took 40 s (a hang at the CLI). Eight here: that regular
    expression takes 40 s or more, the linear passes milliseconds, so the bound is far from both (a
    tight one would fail on a loaded CI machine, where a query alone can take a second)."""
    import time

    repo.commit("a" * 60, {"w": np.zeros(4, np.float32)})
    started = time.monotonic()
    assert ids(repo, 'select m where m.name like "' + "%a" * 8 + '%b"') == []
    assert ids(repo, 'select m where m.name like "' + "%a" * 8 + '%" and m.name like "a_%a"') == [5]
    assert time.monotonic() - started < 15
    assert ids(repo, 'select m where m.name like "%n_%a%" and m.name not like "%avg"') == [1, 4]


def test_hyperparameter_numbers_compare_exactly_past_a_double(tmp_path: Path) -> None:
    """Comparisons ran on the doubles nearest the numbers: 2**53 + 1 was not != 2**53, 2**60 not > 2**60 - 1, a 1e18
    float not = 10**18 (that one compared text), and 10**400 (no double) greater than nothing."""
    r = create_repository(tmp_path / "arc")
    r.commit("big", {"w": np.zeros(4, np.float32)},
             hyperparameters={"f": 1e18, "i": 2**60, "j": 2**53 + 1, "h": 10**400, "s": "5", "b": True})
    for q in ["m.hp.f = 1000000000000000000", f"m.hp.i > {2**60 - 1}", f"m.hp.i < {2**60 + 1}", f"m.hp.j > {2**53}",
              f"m.hp.j != {2**53}", f"m.hp.i = {2**60}", "m.hp.h > 1e308", "m.hp.h < 1e400", "m.hp.f <= 1e18"]:
        assert [v["id"] for v in r.query("select m where " + q)] == [1], q
    for q in [f"m.hp.j = {2**53}", f"m.hp.i != {2**60}", "m.hp.s = 5", "m.hp.b = 1", "m.hp.h = 1e400"]:
        assert r.query("select m where " + q) == [], q
    r.close()


def test_an_integer_literal_past_sqlites_integers_is_compared_exactly(tmp_path: Path) -> None:
    """A literal past 2**63 was read as the double nearest it: m.hp.n = 10**30 missed n = 10**30 (and 10**400,
    which no double holds), while other comparisons with such numbers were exact."""
    with create_repository(tmp_path / "arc") as r:
        r.commit("big", {"w": np.zeros(4, np.float32)}, hyperparameters={"n": 10**30, "m": -(10**30), "h": 10**400})
        for q in [f"m.hp.n = {10**30}", f"m.hp.m = {-(10**30)}", f"m.hp.h = {10**400}", f"m.hp.n != {10**30 + 1}",
                  f"m.hp.n < {10**30 + 1}", f"m.hp.h > {10**400 - 1}", f"m.hp.h >= {10**400}"]:
            assert [v["id"] for v in r.query("select m where " + q)] == [1], q
        for q in [f"m.hp.n = {10**30 + 1}", f"m.hp.n != {10**30}", f"m.hp.h < {10**400}", "m.hp.n = 1e30"]:
            assert r.query("select m where " + q) == [], q


def test_a_step_past_sqlites_integers_neither_commits_nor_takes_the_catalog_down(repo: Repository,
                                                                                 tmp_path: Path) -> None:
    """step=10**30 (or a checkpoint file named ck-<25 digits>.pt) was published, and then indexing the record
    raised OverflowError ("Python int too large to convert to SQLite INTEGER"): every later query, log and commit
    of the archive failed with an internal error."""
    import json

    import torch

    with pytest.raises(InvalidInputError, match="64 bits"):
        repo.commit("huge", {"w": np.zeros(4, np.float32)}, step=10**30)
    path = tmp_path / f"ck-{'9' * 25}.pt"
    torch.save({"w": torch.zeros(4)}, path)
    assert repo.commit("file", path).snapshots[0]["step"] is None  # no step, as a name without a number
    record = json.loads(json.dumps(repo.version(5).record))  # a record with such a step written all the same
    record["id"], record["snapshots"][0]["step"] = 6, 10**30
    (repo.root / "versions" / "6.json").write_bytes(seal(record))
    assert ids(repo, "select m") == [1, 2, 3, 4, 5]  # it stays out of the catalog; the others are served


def test_reindex_sweeps_a_killed_rebuilds_temporary_catalog_where_flock_is_nfs(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On NFS a flock is an fcntl lock: an exclusive one needs the file open for writing (EBADF else). The
    sweep opened a lock file read-only, so there it never took the lock and never removed what a killed
    rebuild left."""
    import errno
    import fcntl

    import gpupas.catalog as catalog_mod

    real = fcntl.flock

    def nfs_flock(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX and os.O_RDONLY == fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real(fd, op)

    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("a", {"w": np.arange(4, dtype=np.float32)})
        left = arc / f".{FILENAME}.1.deadbeef.tmp"
        left.write_bytes(b"")
        Path(f"{left}.lock").write_bytes(b"")
        monkeypatch.setattr(catalog_mod.fcntl, "flock", nfs_flock)
        repo.reindex()
    assert not left.exists() and not Path(f"{left}.lock").exists()


def test_query_and_stats_give_a_versions_stored_bytes_as_log_does_after_a_revision(tmp_path: Path) -> None:
    """A revision (compaction, tier move) changes what a snapshot stores; the version record keeps the commit's
    sizes. `gpupas query` (its column, WHERE and ORDER BY) and `stats`' per-version rows said those, `log` and
    `show` what the manifests say now."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 256)) * 0.02).astype(np.float32)
    with create_repository(tmp_path / "arc") as r:
        v = r.commit("run", [{"w": w}, {"w": w + (rng.standard_normal(w.shape) * 1e-4).astype(np.float32)}])
        r.commit("other", {"w": np.zeros(4, np.float32)})
        second = v.snapshots[1]["id"]
        r.archive.revise(second, base=None)  # the delta stored whole: more bytes
        now = sum(r.archive.manifest(s["id"]).stored_bytes for s in v.snapshots)
        assert now > sum(s["stored_bytes"] for s in v.snapshots)
        assert {x["id"]: x["stored_bytes"] for x in r.log()}[v.id] == now
        assert {x["id"]: x["stored_bytes"] for x in r.query("select m")}[v.id] == now
        assert ids(r, f"select m where m.stored_bytes = {now}") == [v.id]
        assert ids(r, "select m order by m.stored_bytes desc") == [v.id, 2]
        assert {x["id"]: x["stored_bytes"] for x in r.stats()["per_version"]}[v.id] == now


@settings(max_examples=400, deadline=None)
@given(pattern=st.text("ab%_!é", max_size=7), value=st.text("ab%_!é", max_size=6), escape=st.sampled_from([None, "!"]))
def test_like_matches_sqlites_own_case_sensitive_like(pattern: str, value: str, escape: str | None) -> None:
    """The catalog's LIKE (linear, case-sensitive) answers as SQLite's built-in LIKE does under
    case_sensitive_like, ESCAPE included (a lone escape character at the end matches nothing in both)."""
    conn = sqlite3.connect(":memory:")
    conn.execute("PRAGMA case_sensitive_like=ON")
    if escape is None:
        want = conn.execute("SELECT ? LIKE ?", (value, pattern)).fetchone()[0]
    else:
        want = conn.execute("SELECT ? LIKE ? ESCAPE ?", (value, pattern, escape)).fetchone()[0]
    conn.close()
    assert _like(pattern, value, escape) == bool(want)
