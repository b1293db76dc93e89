"""The gpupas command line, run as a user runs it: a subprocess per command, outputs and exit codes checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import realdata

from gpupas.integrations.safetensors import save_file
from gpupas.tensors import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def _cmd(args: tuple[str | Path, ...], archive: Path | None, env: dict[str, str] | None) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "gpupas.cli", *map(str, args)]
    if archive is not None:
        cmd += ["-A", str(archive)]
    base = {k: v for k, v in os.environ.items() if k != "GPUPAS_ARCHIVE"}
    return cmd, base | {"PYTHONPATH": PYTHONPATH, "COLUMNS": "200", "GPUPAS_AUTHOR": "tester"} | (env or {})


def gp(*args: str | Path, archive: Path | None = None, env: dict[str, str] | None = None,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``gpupas ARGS [-A archive]`` in a fresh interpreter."""
    cmd, full = _cmd(args, archive, env)
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=cwd or ROOT, timeout=120)


def gp_all(*calls: tuple[str | Path, ...], archive: Path) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands at once (they must not depend on each other); results in order."""
    procs = []
    for args in calls:
        cmd, full = _cmd(args, archive, None)
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
                                            cwd=ROOT)))
    out = []
    for cmd, p in procs:
        so, se = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(cmd, p.returncode, so, se))
    return out


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"rc={res.returncode}\nstdout={res.stdout}\nstderr={res.stderr}"
    return res.stdout


def js(res: subprocess.CompletedProcess[str]) -> object:
    """The command's stdout as strict JSON (NaN and Infinity, which JSON lacks, fail)."""
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in JSON output")

    return json.loads(ok(res), parse_constant=refuse)


def fails(res: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert res.returncode == code, f"rc={res.returncode} (want {code})\nstdout={res.stdout}\nstderr={res.stderr}"
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), res.stderr
    if code != 2 or "Usage" not in res.stderr:  # our own errors: one line, no traceback
        assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    return res.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return realdata.training_run(tmp_path_factory.mktemp("run"))


def files_of(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and not p.name.startswith("catalog.sqlite")}


def test_end_to_end_session(tmp_path: Path, run: Path) -> None:
    arc = tmp_path / "arc"
    ckpts = sorted(run.glob("step-*.safetensors"))
    assert "created archive" in ok(gp("init", arc))
    fails(gp("init", arc), 2, "already an archive")

    out = ok(gp("import", run, "--name", "digits", "--metrics", run / "train_log.csv", "--hparams",
                run / "config.json", "-f", run / "config.json", "-m", "digits run", archive=arc))
    assert "imported 4 versions of digits: 1..4" in out

    rows = js(gp("log", "--json", archive=arc))
    assert [(r["id"], r["name"], r["parents"]) for r in rows] == [(1, "digits", []), (2, "digits", [1]),
                                                                   (3, "digits", [2]), (4, "digits", [3])]
    text = ok(gp("log", archive=arc))
    assert "#1 digits" in text and "#4 digits ← #3" in text and "digits run" in text
    assert ok(gp("list", archive=arc)) == text

    d = js(gp("show", "digits", "--json", archive=arc))
    assert d["id"] == 4 and d["parents"] == [3] and d["hyperparameters"]["lr"] == 0.01
    assert d["files"]["config.json"]["size"] > 0 and d["network"]["nodes"]
    assert {r["layer"] for r in d["layers"]} >= {"fc1", "fc2"}
    assert all(0 < r["stored_bytes"] for r in d["layers"])
    assert d["snapshot"]["base"] == js(gp("show", "3", "--json", archive=arc))["latest"]  # delta to its parent
    text = ok(gp("show", "2", "--tensors", archive=arc))
    for word in ("version 2", "snapshots", "hyperparameters", "metrics", "storage per layer", "fc1.weight", "total"):
        assert word in text
    assert ok(gp("desc", "2", "--tensors", archive=arc)) == text

    diff = js(gp("diff", "1", "4", "--json", archive=arc))
    assert diff["hyperparameters"] == {} and diff["network"]["added"] == []
    assert diff["metrics"]["loss"][1] < diff["metrics"]["loss"][0]
    assert diff["weights"]["identical"] == 0 and diff["weights"]["rel_l2"] > 0
    text = ok(gp("diff", "1", "4", "--top", "3", archive=arc))
    assert "weights: " in text and "rel L2" in text and "network: same" in text

    assert "tagged version 2 as v1" in ok(gp("tag", "v1", "2", archive=arc))
    assert js(gp("tag", "--json", archive=arc)) == {"v1": 2}
    assert "(v1)" in ok(gp("log", archive=arc))
    assert js(gp("show", "v1", "--json", archive=arc))["tags"] == ["v1"]

    co = tmp_path / "co"
    ok(gp("checkout", "v1", "-o", co, archive=arc))
    got, want = load_checkpoint(co / "model.safetensors"), load_checkpoint(ckpts[1])
    assert got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert (co / "config.json").read_bytes() == (run / "config.json").read_bytes()
    assert json.loads((co / "gpupas-version.json").read_text())["id"] == 2
    ok(gp("export", "4", "-o", tmp_path / "v4.safetensors", archive=arc))
    got = load_checkpoint(tmp_path / "v4.safetensors")
    assert all(np.array_equal(got[k], v) for k, v in load_checkpoint(ckpts[3]).items())

    # one version holding a whole run as time-ordered snapshots, fine-tuned from v1
    out = ok(gp("commit", run, "-n", "digits-ft", "-p", "v1", "--hp", "lr=0.02", "--hp", "sched=cosine",
                "--metrics", run / "train_log.csv", "--metric", "test_accuracy=0.91", "--best-by", "loss:min",
                "--network", run / "network.json", "-m", "fine-tune", archive=arc))
    assert "committed version 5 (digits-ft): 4 snapshot(s)" in out and "parents 2" in out
    v5 = js(gp("show", "5", "--json", archive=arc))
    assert len(v5["snapshots"]) == 4 and v5["best"] in {s["id"] for s in v5["snapshots"]}
    assert v5["hyperparameters"] == {"lr": 0.02, "sched": "cosine"}
    assert v5["metrics"]["test_accuracy"] == [[60, 0.91]]
    assert v5["snapshots"][0]["base"] == js(gp("show", "2", "--json", archive=arc))["latest"]
    assert "created version 6 (scaffold) from version 5" in ok(gp("copy", "5", "-n", "scaffold", archive=arc))

    q = js(gp("query", 'select m where m.name like "digits%" and m.hp.lr > 0.015 and m.metric.test_accuracy >= 0.9',
              "--json", archive=arc))
    assert [r["id"] for r in q] == [5]
    q = js(gp("query", "select m where m.parent = 5 or m.tag = \"v1\"", "--json", archive=arc))
    assert [r["id"] for r in q] == [2, 6]
    text = ok(gp("query", 'select m where m["fc[12]"]', archive=arc))
    assert "digits-ft" in text
    q = js(gp("query", 'select m where m["conv[1-3]"].next has POOL("MAX") or m["fc1"].next has RELU', "--json",
              archive=arc))
    assert [r["id"] for r in q] == [5, 6]  # the versions with a real network graph (6 is a copy of 5)
    assert [r["id"] for r in js(gp("log", "3", "--json", archive=arc))] == [1, 2, 3, 4]  # ancestors, descendants

    assert ok(gp("verify", archive=arc)).startswith("ok: 6 versions, 8 snapshots")
    assert js(gp("verify", "5", "--json", archive=arc))["checked"]["snapshots"] == 4
    st = js(gp("stats", "--json", archive=arc))
    assert st["versions"] == 6 and st["snapshots"] == 8 and 0 < st["ratio"] < 1 and st["saved_bytes"] > 0
    assert {r["enc"] for r in st["by_encoding"]} >= {"mat"} and len({r["enc"] for r in st["by_encoding"]}) >= 2
    assert st["files"]["blobs"] == 1 and st["files"]["references"] == 4
    assert "weights:" in ok(gp("stats", archive=arc))
    counts = js(gp("reindex", "--json", archive=arc))
    assert counts["versions"] == 6 and counts["tags"] == 1

    # damage one chunk: verify finds it, exit code 3
    chunk = next(p for p in sorted((arc / "snapshots").rglob("c/0")))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    res = gp("verify", archive=arc)
    assert res.returncode == 3 and "damaged:" in res.stderr and res.stderr.strip().splitlines()[-1].startswith("error:")
    assert js(gp("log", "--json", archive=arc))  # reading the rest still works


def test_bad_input_gives_a_clear_message_and_changes_nothing(tmp_path: Path, run: Path) -> None:
    arc = tmp_path / "arc"
    ok(gp("init", arc))
    ckpts = sorted(run.glob("step-*.safetensors"))
    ok(gp("commit", ckpts[0], "-n", "good", archive=arc))
    before, log_before = files_of(arc), ok(gp("log", "--json", archive=arc))

    bad = tmp_path / "bad"
    bad.mkdir()
    for p in ckpts:
        (bad / p.name).write_bytes(p.read_bytes())
    broken = bad / ckpts[-1].name
    broken.write_bytes(broken.read_bytes()[:200])  # truncated, last in order: earlier files were already stored
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    sid = next((arc / "manifests").glob("*.json")).stem
    loop = tmp_path / "loop.json"
    loop.write_text(json.dumps({"target": {sid: sid}}))  # a plan that makes a snapshot a delta on itself

    expected = [  # (arguments, exit code, words in the message)
        (("show", "99"), 1, ["no version 99", "gpupas log"]),
        (("show", "nope"), 1, ["no version, tag or name 'nope'"]),
        (("diff", "1", "99"), 1, []),
        (("checkout", "99", "-o", tmp_path / "co"), 1, []),
        (("verify", "99"), 1, []),
        (("show", "1", "--snapshot", "7"), 1, ["snapshots 1..1"]),
        (("commit", notes, "-n", "x"), 2, ["unknown checkpoint type '.txt'"]),
        (("commit", tmp_path / "missing.safetensors", "-n", "x"), 2, ["does not exist"]),
        (("commit", broken, "-n", "x"), 2, ["not a valid safetensors file"]),
        (("commit", bad, "-n", "x"), 2, ["not a valid safetensors file"]),
        (("import", bad, "-n", "chain"), 2, ["not a valid safetensors file"]),
        (("import", bad / ckpts[0].name, "-n", "chain"), 2, ["import takes a directory"]),
        (("commit", ckpts[0], "-n", "../evil"), 2, ["version name '../evil' is not allowed"]),
        (("commit", ckpts[0], "-n", "x y"), 2, ["not allowed"]),
        (("commit", ckpts[0], "-n", "ok", "-p", "99"), 1, []),
        (("commit", ckpts[0], "-n", "ok", "--hp", "novalue"), 2, ["KEY=VALUE"]),
        (("commit", ckpts[0], "-n", "ok", "--metrics", notes), 2, ["unknown type"]),
        (("tag", "bad/tag", "1"), 2, ["not allowed"]),
        (("tag", "42", "1"), 2, ["digits only"]),
        (("show", "../../etc/passwd"), 2, ["not allowed"]),
        (("query", "select m where"), 2, ["DQL"]),
        (("checkout", "1", "-o", tmp_path / "co", "--format", "zip"), 2, []),
        (("tag", "good", "1"), 2, ["names version(s) 1", "hide"]),  # a tag would shadow the name
        (("export", "1", "-o", tmp_path, "--force"), 2, ["is a folder"]),
        (("checkout", "1", "-o", notes), 2, ["is a file, not a folder"]),
        (("init", notes), 2, ["is a file, not a folder"]),
        (("plan", "--alpha", "nan"), 2, ["at least 1"]),
        (("gc", "--min-age", "nan"), 2, ["--min-age nan", "at least 0"]),
        (("compact", "--workers", "0", "--dry-run"), 2, ["at least one worker"]),
        (("compact", "--plan", loop, "--dry-run"), 2, ["the plan makes a loop through " + sid]),
        (("compact", "--codec", "deflate", "--scheduler", "sync"), 2, ["lack zstd", "zstd,deflate"]),
    ]
    results = gp_all(*(args for args, _, _ in expected), archive=arc)  # all at once: none may change anything
    for (_, code, words), res in zip(expected, results):
        fails(res, code, *words)
    fails(gp("log", archive=tmp_path / "nowhere"), 1, "no archive", "gpupas init")
    fails(gp("log", archive="nope://x"), 2, "Protocol not known", "an s3:// URL")  # type: ignore[arg-type]
    assert not (tmp_path / "co").exists()
    res = gp("commit", ckpts[0], archive=arc)  # no --name: Typer's own usage error
    assert res.returncode == 2 and "--name" in res.stderr
    res = gp("diff", "1", "1", "--top", "-1", archive=arc)
    assert res.returncode == 2 and "--top" in res.stderr

    assert files_of(arc) == before
    assert ok(gp("log", "--json", archive=arc)) == log_before
    assert ok(gp("verify", archive=arc)).startswith("ok: 1 version, 1 snapshot,")


@pytest.mark.skipif(not realdata.have_torch(), reason="torch is not installed")
def test_torch_files_are_read_without_executing_code(tmp_path: Path, run: Path) -> None:
    import torch

    arc = tmp_path / "arc"
    ok(gp("init", arc))
    state = {k: torch.from_numpy(v) for k, v in load_checkpoint(sorted(run.glob("*.safetensors"))[0]).items()}
    torch.save(state, tmp_path / "good.pt")
    ok(gp("commit", tmp_path / "good.pt", "-n", "from-torch", archive=arc))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "evil": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    fails(gp("commit", tmp_path / "evil.pt", "-n", "evil", archive=arc), 2, "weights only")
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 50)
    fails(gp("commit", tmp_path / "garbage.pt", "-n", "garbage", archive=arc), 2, "not a loadable torch checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(gp("commit", tmp_path / "empty.pt", "-n", "empty", archive=arc), 2, "the file is empty")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not its state_dict
    msg = fails(gp("commit", tmp_path / "module.pt", "-n", "module", archive=arc), 2, "save model.state_dict()")
    assert "\x1b[" not in msg and len(msg) < 400
    torch.save({"n": torch.tensor(7), "w": torch.ones(3)}, tmp_path / "scalar.pt")  # a 0-d tensor, as BatchNorm has
    ok(gp("commit", tmp_path / "scalar.pt", "-n", "scalar", archive=arc))
    torch.save({"n": torch.tensor(8), "w": torch.ones(3)}, tmp_path / "scalar2.pt")
    ok(gp("commit", tmp_path / "scalar2.pt", "-n", "scalar", "-p", "scalar", archive=arc))
    assert "scalar" in ok(gp("diff", "scalar", "2", archive=arc))  # 0-d tensors in the table
    ok(gp("export", "from-torch", "-o", tmp_path / "out.pt", archive=arc))
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert [r["id"] for r in js(gp("log", "--json", archive=arc))] == [1, 2, 3]


def test_archive_from_environment(tmp_path: Path, run: Path) -> None:
    env = {"GPUPAS_ARCHIVE": str(tmp_path / "envarc")}
    ok(gp("init", env=env))
    ok(gp("commit", sorted(run.glob("*.safetensors"))[0], "-n", "e", env=env))
    assert [r["name"] for r in js(gp("log", "--json", env=env))] == ["e"]
    ok(gp("init", cwd=tmp_path))  # default: ./gpupas-archive
    assert (tmp_path / "gpupas-archive" / "zarr.json").is_file()


def test_best_marks_a_snapshot_and_branches_start_where_told(tmp_path: Path) -> None:
    from gpupas.versions.repository import create_repository

    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        run = repo.commit("run", [{"w": np.full(64, k, np.float32)} for k in range(3)])
    fails(gp("checkout", "run", "-s", "best", "-o", tmp_path / "out", archive=arc), 1, "gpupas best VERSION N")
    assert "snapshot " + run.snapshots[1]["id"] in ok(gp("best", "run", "2", archive=arc))
    fails(gp("best", "run", "7", archive=arc), 1)
    save_file({"w": np.full(64, 1.5, np.float32)}, tmp_path / "ft.safetensors")
    ft, shown = gp_all(("commit", tmp_path / "ft.safetensors", "-n", "ft", "--parent", "run", "--from-snapshot",
                        "best", "--json"), ("show", "run", "--json"), archive=arc)
    assert js(ft)["snapshots"][0]["base"] == js(shown)["best"] == run.snapshots[1]["id"]


def test_show_and_diff_write_hyperparameter_text_as_it_is(tmp_path: Path) -> None:
    """A hyperparameter's text was shown as JSON escapes (``"\\u00e9"`` for é) in show's and diff's tables, while
    names beside them were shown as written; control characters are still escaped."""
    from gpupas.versions.repository import create_repository

    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("a", {"w": np.zeros(4, np.float32)}, hyperparameters={"data": "café-数据", "tab": "a\tb"})
        repo.commit("b", {"w": np.zeros(4, np.float32)}, hyperparameters={"data": "thé"})
    shown, diffed = gp_all(("show", "a"), ("diff", "a", "b"), archive=arc)
    for out in (ok(shown), ok(diffed)):
        assert '"café-数据"' in out and "\\u" not in out and '"a\\tb"' in out
    assert '"thé"' in ok(diffed)


def test_json_output_is_strict_json_when_numbers_overflow(tmp_path: Path) -> None:
    """A diff of float64 tensors near the largest doubles overflows its sums: null, never NaN or Infinity."""
    from gpupas.integrations.safetensors import save_file

    arc = tmp_path / "arc"
    ok(gp("init", archive=arc))
    for i, scale in enumerate((1e300, -1e300)):
        save_file({"w": np.full(8, scale), "b": np.ones(3)}, tmp_path / f"{i}.safetensors")
        ok(gp("commit", tmp_path / f"{i}.safetensors", "-n", "big", *(["-p", "1"] if i else []), archive=arc))
    rows = {r["name"]: r for r in js(gp("diff", "1", "2", "--json", archive=arc))["weights"]["tensors"]}
    assert rows["w"]["rel_l2"] == 2.0 and rows["b"]["rel_l2"] == 0.0  # ||2e300|| / ||1e300||


def test_diff_from_all_zero_weights_is_not_reported_as_no_change(tmp_path: Path) -> None:
    """Weights that start at zero (a zero-initialised bias, a LoRA B matrix) and then change have no relative
    change: the diff said "overall relative L2 change 0" (JSON 0.0) and listed that tensor as the least changed."""
    arc = tmp_path / "arc"
    ok(gp("init", archive=arc))
    rng = np.random.default_rng(0)
    w = rng.standard_normal(64).astype(np.float32)
    save_file({"lora_B": np.zeros(16, np.float32)}, tmp_path / "0.safetensors")
    save_file({"lora_B": np.ones(16, np.float32)}, tmp_path / "1.safetensors")
    save_file({"lora_B": np.ones(16, np.float32), "w": w}, tmp_path / "2.safetensors")
    save_file({"lora_B": np.zeros(16, np.float32), "w": w + 1e-3}, tmp_path / "3.safetensors")
    for i in range(4):
        ok(gp("commit", tmp_path / f"{i}.safetensors", "-n", f"v{i}", archive=arc))
    d = js(gp("diff", "v0", "v1", "--json", archive=arc))["weights"]
    assert d["identical"] == 0 and d["rel_l2"] != 0.0
    assert "relative L2 change 0;" not in ok(gp("diff", "v0", "v1", archive=arc))
    top = ok(gp("diff", "v3", "v2", "--top", "1", archive=arc))  # lora_B: zeros -> ones; w: a 1e-3 change
    assert "lora_B" in top and "│ w " not in top, top


@pytest.mark.parametrize("command", ["checkout", "export"])
def test_checkout_and_export_by_name_resolve_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     command: str) -> None:
    """A version committed under the name while `checkout NAME -s 2` (or export) writes: the command reports
    what it wrote, not an error about the newer version (it resolved the name again for its lossy note, and
    failed with 'snapshots 1..1, not 2' after writing the old one's weights)."""
    from typer.testing import CliRunner

    from gpupas.cli.app import app
    from gpupas.versions.repository import Repository, create_repository

    with create_repository(tmp_path / "arc") as repo:
        repo.commit("m", [{"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)}])
    real = getattr(Repository, command)

    def then_commit(self: Repository, *args: object, **kw: object) -> object:
        out = real(self, *args, **kw)
        self.commit("m", {"w": np.full(3, 2, np.float32)})
        return out

    monkeypatch.setattr(Repository, command, then_commit)
    out = tmp_path / ("co" if command == "checkout" else "w.safetensors")
    res = CliRunner().invoke(app, ["-A", str(tmp_path / "arc"), command, "m", "-s", "2", "-o", str(out)])
    assert res.exit_code == 0 and "error" not in res.output, res.output
    weights = out / "model.safetensors" if command == "checkout" else out
    assert load_checkpoint(weights)["w"].tolist() == [1, 1, 1]


def test_checkout_refuses_weights_named_as_its_metadata(tmp_path: Path) -> None:
    """--weights-name gpupas-version.json: the metadata written after the weights replaced them (exit 0)."""
    arc, ck = tmp_path / "arc", tmp_path / "w.safetensors"
    save_file({"w": np.arange(8, dtype=np.float32)}, ck)
    ok(gp("init", arc))
    ok(gp("commit", ck, "-n", "m", archive=arc))
    for name in ("gpupas-version.json", "GPUPAS-version.JSON", "gpupas-version.json/w.safetensors"):
        fails(gp("checkout", "m", "-o", tmp_path / "out", "--weights-name", name, archive=arc), 2, "metadata")
        assert not (tmp_path / "out").exists()
    ok(gp("checkout", "m", "-o", tmp_path / "out", "--weights-name", "weights.safetensors", archive=arc))
    got = load_checkpoint(tmp_path / "out" / "weights.safetensors")
    assert got["w"].tobytes() == load_checkpoint(ck)["w"].tobytes()


def test_output_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    """`gpupas log | head`: the reader gone, every command stops with 141 (as after SIGPIPE) and no message;
    it printed 'error: [Errno 32] Broken pipe' with exit 4, or (rich's tables) exited 1, which means "not found"."""
    arc, ck = tmp_path / "arc", tmp_path / "w.safetensors"
    save_file({"w": np.arange(8, dtype=np.float32)}, ck)
    ok(gp("init", arc))
    ok(gp("commit", ck, "-n", "m", archive=arc))
    ok(gp("tag", "t", "1", archive=arc))
    for args in (("tag",), ("log",), ("log", "--json"), ("show", "m"), ("stats",)):
        read, write = os.pipe()
        os.close(read)  # every write to the pipe fails with EPIPE
        cmd, env = _cmd(args, arc, None)
        try:
            res = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
        finally:
            os.close(write)
        assert (res.returncode, res.stderr) == (141, ""), (args, res.returncode, res.stderr)


def test_json_option_given_a_folder_is_bad_input(tmp_path: Path) -> None:
    """--hparams/--network DIR: exit 2 with the option's name, not 4 and a bare 'Is a directory: DIR'."""
    arc, ck = tmp_path / "arc", tmp_path / "w.safetensors"
    save_file({"w": np.arange(8, dtype=np.float32)}, ck)
    ok(gp("init", arc))
    for opt, what in (("--hparams", "hyperparameters file"), ("--network", "network file")):
        fails(gp("commit", ck, "-n", "m", opt, tmp_path, archive=arc), 2, what, "is a folder")
    assert js(gp("log", "--json", archive=arc)) == []


def test_tag_delete_takes_exactly_one_tag(tmp_path: Path) -> None:
    """`tag -d a b` deleted a and ignored b (taken as a VERSION), exit 0; `tag -d` listed the tags, exit 0."""
    arc, ck = tmp_path / "arc", tmp_path / "w.safetensors"
    save_file({"w": np.arange(8, dtype=np.float32)}, ck)
    ok(gp("init", arc))
    ok(gp("commit", ck, "-n", "m", archive=arc))
    ok(gp("tag", "a", "1", archive=arc))
    ok(gp("tag", "b", "1", archive=arc))
    fails(gp("tag", "-d", "a", "b", archive=arc), 2, "one tag")
    fails(gp("tag", "-d", archive=arc), 2, "one tag")
    fails(gp("tag", "--force", archive=arc), 2, "TAG VERSION")
    assert js(gp("tag", "--json", archive=arc)) == {"a": 1, "b": 1}
    assert js(gp("tag", "-d", "a", "--json", archive=arc)) == {"tag": "a", "version": 1, "deleted": True}
    assert js(gp("tag", "--json", archive=arc)) == {"b": 1}


def test_log_keeps_a_main_line_with_side_branches_at_one_level() -> None:
    """Each branch point indented the rest of the main line one level deeper: a main line with a side branch every
    10 versions printed its 2,000th version at column ~1,050 (1 MB of output, quadratic). The child of the
    version's own name continues its line; side branches indent below their branch point."""
    from rich.console import Console

    from gpupas.cli.render import log_tree

    rows, vid = [], 0

    def add(name: str, parents: list[int]) -> int:
        nonlocal vid
        vid += 1
        rows.append({"id": vid, "name": name, "parents": parents, "tags": [], "n_snapshots": 1, "stored_bytes": 1,
                     "raw_bytes": 2, "created": "2026-12-07T10:00", "message": ""})
        return vid

    head = add("main", [])
    for k in range(40):
        side = add(f"exp{k}", [head])
        add(f"exp{k}", [side])
        head = add("main", [head])
    console = Console(width=400, record=True)
    console.print(log_tree(rows, "arc"))
    lines = console.export_text().splitlines()
    main_cols = {line.index("#") for line in lines if " main" in line}
    side_cols = {line.index("#") for line in lines if " exp" in line}
    assert len(main_cols) == 1 and side_cols == {min(main_cols) + 4}, (main_cols, side_cols)
    assert [int(line.split("#")[1].split()[0]) for line in lines if " main" in line] == [
        r["id"] for r in rows if r["name"] == "main"]


def test_show_lists_the_ends_and_the_best_of_a_long_run(tmp_path: Path) -> None:
    """`show` of a version with thousands of snapshots printed a row for each (3,000: 2.5 s and 85 MB of table); a
    long run shows its first 10, last 20 and best snapshot, and says how many it left out (--json: all)."""
    from gpupas.versions.repository import create_repository

    w = np.zeros(4, np.float32)
    with create_repository(tmp_path / "arc") as repo:
        v = repo.commit("run", {"w": w}, step=0)
        for step in range(1, 60):
            repo.add_snapshot(v.id, {"w": w + np.float32(step)}, step=step)
        repo.mark_best(v.id, 30)  # the 30th snapshot, in the part left out
    out = ok(gp("show", "run", archive=tmp_path / "arc"))
    rows = [line for line in out.splitlines() if "latest" in line or "best" in line or "more" in line]
    assert "... 19 more (show --json lists all)" in out and "... 10 more" in out, out
    numbers = [int(m.group(1)) for m in re.finditer(r"^│\s*(\d+) │", out, re.MULTILINE)]
    assert numbers == [*range(1, 11), 30, *range(41, 61)], numbers
    assert any("best" in line for line in rows) and any("latest" in line for line in rows)
    assert len(js(gp("show", "run", "--json", archive=tmp_path / "arc"))["snapshots"]) == 60


def test_diff_shows_a_layer_whose_type_changed_as_old_and_new(tmp_path: Path) -> None:
    """A layer that changed type (a Linear become a Conv2d under one name) was shown as a Python list,
    "~ fc1 ['Linear', 'Conv2d']: ..."; and one whose type alone changed ended in a bare colon."""
    arc = tmp_path / "arc"
    ok(gp("init", archive=arc))
    save_file({"fc1.weight": np.ones((4, 3), np.float32)}, tmp_path / "0.safetensors")
    save_file({"fc1.weight": np.ones((4, 3, 3, 3), np.float32)}, tmp_path / "1.safetensors")
    for i in range(2):
        ok(gp("commit", tmp_path / f"{i}.safetensors", "-n", f"v{i}", archive=arc))
    net = {"nodes": [{"id": 0, "name": "act", "type": "ReLU"}], "edges": []}
    for i, kind in enumerate(("ReLU", "GELU")):
        (tmp_path / f"net{i}.json").write_text(json.dumps(net | {"nodes": [net["nodes"][0] | {"type": kind}]}))
        ok(gp("commit", tmp_path / "0.safetensors", "-n", f"n{i}", "--network", tmp_path / f"net{i}.json",
              archive=arc))
    out = ok(gp("diff", "v0", "v1", "--no-weights", archive=arc))
    assert "  ~ fc1 Linear -> Conv2d: " in out and "['" not in out, out
    assert "  ~ act ReLU -> GELU\n" in ok(gp("diff", "n0", "n1", "--no-weights", archive=arc))


def test_diff_says_when_weights_were_not_compared(tmp_path: Path) -> None:
    """diff against a version without snapshots printed no weights line at all."""
    from gpupas.versions.repository import create_repository

    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        repo.commit("a", {"w": np.zeros(4, np.float32)})
        repo.commit("b", None, parents=[1])
    assert "weights: not compared (no snapshots in version 2)" in ok(gp("diff", "a", "b", archive=arc))


def test_drop_is_said_done_where_another_version_record_is_damaged(tmp_path: Path) -> None:
    """drop's account of what gc frees reads every record: a damaged one of another version is warned about, not
    an exit 3 after the drop was written (a rerun of `drop 2` would drop another snapshot)."""
    from gpupas.versions.repository import create_repository

    arc = tmp_path / "arc"
    with create_repository(arc) as repo:
        sids = [s["id"] for s in repo.commit("run", [{"w": np.full(64, k, np.float32)} for k in range(3)]).snapshots]
        repo.commit("other", {"w": np.zeros(8, np.float32)})
    rec = arc / "versions" / "2.json"
    rec.write_bytes(rec.read_bytes().replace(b'"other"', b'"otheR"'))
    res = gp("drop", "run", "2", archive=arc)
    assert res.returncode == 0 and res.stdout.startswith(f"dropped 1 snapshot of version 1 (run): {sids[1]}"), res
    assert "could not be worked out" in res.stderr and "versions/2.json" in res.stderr, res.stderr


def test_drop_round_trip_says_what_gc_frees_and_what_stays(tmp_path: Path) -> None:
    from gpupas.versions.repository import create_repository

    arc = tmp_path / "arc"
    ws = [np.full(256, k, np.float32) + np.arange(256, dtype=np.float32) for k in range(4)]
    with create_repository(arc) as repo:
        repo.commit("run", [{"w": w} for w in ws[:3]])  # s0 <- s1 <- s2
        repo.copy("run", "fork")  # shares s2
        sids = [s["id"] for s in repo.add_snapshot("run", {"w": ws[3]}).snapshots]  # s3 on s2
    fails(gp("drop", "run", "9", archive=arc), 2, "nothing dropped", "gpupas show")
    fails(gp("drop", "run", archive=arc), 2, "--keep-last N")
    fails(gp("drop", "run", "--keep-last", "0", archive=arc), 2, "--all")
    out = ok(gp("drop", "run", "2", "3", "4", "--dry-run", archive=arc))
    assert out.startswith(f"would drop 3 snapshots of version 1 (run): {sids[1]}, {sids[2]}, {sids[3]}"), out
    assert "`gpupas gc --min-age 0` then frees 1 snapshot" in out and sids[3] in out.splitlines()[1]
    assert f"{sids[1]} stays, the base of kept snapshot {sids[2]}: gc frees this one once `gpupas compact`" in out
    assert f"{sids[2]} stays, named by version 2" in out
    assert len(js(gp("show", "run", "--json", archive=arc))["snapshots"]) == 4  # a dry run changes nothing
    d = js(gp("drop", "run", "--keep-last", "1", "--json", archive=arc))
    assert d["dropped"] == sids[:3] and d["snapshots"] == [sids[3]] and d["gc"][sids[0]]["gc"] == "keeps"
    shown, listed = gp_all(("show", "run", "--json"), ("log", "--json"), archive=arc)
    assert [s["id"] for s in js(shown)["snapshots"]] == [sids[3]]
    assert [r["n_snapshots"] for r in js(listed)] == [1, 1]
    assert "dropped" not in ok(gp("gc", "--min-age", "0", archive=arc))  # every dropped one is a base: none go
    ok(gp("drop", "fork", "1", "--all", archive=arc))  # now s2 is the base of s3 alone
    assert ok(gp("verify", archive=arc)).startswith("ok:")
    from gpupas.versions.repository import open_repository

    with open_repository(arc) as repo:
        assert repo.restore("run")["w"].tobytes() == ws[3].tobytes()
    out = ok(gp("compact", "--scheduler", "sync", archive=arc))  # s3 re-based off the dropped chain: stored whole
    assert "1 snapshot(s) revised" in out and "and so are 3 snapshot(s) no version keeps" in out, out
    assert ok(gp("gc", "--min-age", "0", archive=arc)).count("dropped") == 3, out
    with open_repository(arc) as repo:
        assert repo.restore("run")["w"].tobytes() == ws[3].tobytes()


def test_log_says_which_stored_bytes_a_copy_shares(tmp_path: Path) -> None:
    """A copy names its source's latest snapshot: log gave each version those bytes as its own, so its rows
    added up to more than the archive stores, and nothing said so. Each row says what it shares with an earlier
    version (``shared_bytes``), and the rows less that add up to stats' total."""
    from typer.testing import CliRunner

    from gpupas.cli.app import app
    from gpupas.versions.repository import create_repository

    w = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    with create_repository(tmp_path / "arc") as repo:
        repo.commit("a", [{"w": w}, {"w": w + np.float32(1e-3)}])
        repo.copy("a", "b")
        repo.add_snapshot("b", {"w": w + np.float32(2e-3)})
        rows, total = repo.log(), repo.stats()["stored_bytes"]
        latest = repo.archive.manifest(repo.version("a").latest).stored_bytes
    assert [r["shared_bytes"] for r in rows] == [0, latest]
    assert sum(r["stored_bytes"] - r["shared_bytes"] for r in rows) == total < sum(r["stored_bytes"] for r in rows)
    text = CliRunner().invoke(app, ["-A", str(tmp_path / "arc"), "log"], env={"COLUMNS": "200"}).output
    (line,) = [x for x in text.splitlines() if "#2 b" in x]
    assert "shared" in line and "shared" not in next(x for x in text.splitlines() if "#1 a" in x), text
