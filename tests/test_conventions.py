"""What a new user expects: the command line's conventions (git/DVC/MLflow habits), checkpoints in the
layouts training code writes, and gc after a killed commit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import gpupas

ROOT = Path(__file__).resolve().parents[1]


def gp(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
       tty_columns: str | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("GPUPAS_ARCHIVE", "COLUMNS")} | {"GPUPAS_AUTHOR": "t"}
    if tty_columns:
        full["COLUMNS"] = tty_columns
    return subprocess.run([sys.executable, "-m", "gpupas", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full | (env or {}), timeout=120)


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"fc.weight": (rng.standard_normal((64, 32)) * 0.02).astype(np.float32),
            "fc.bias": np.zeros(64, np.float32)}


@pytest.fixture
def arc(tmp_path: Path) -> Path:
    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("net", tensors(0), message="a long message " + "x" * 150)
        repo.commit("net", tensors(1), parents=[1])
    return tmp_path / "arc"


def test_global_options_before_the_command_and_version(arc: Path) -> None:
    res = gp("-A", arc, "log", "--json")  # as git -C
    assert res.returncode == 0 and [r["id"] for r in json.loads(res.stdout)] == [1, 2]
    assert json.loads(gp("log", "-A", arc, "--json").stdout) == json.loads(res.stdout)  # after it, too
    v = gp("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"gpupas {gpupas.__version__}"
    assert subprocess.run(["gpupas", "--version"], capture_output=True, text=True).stdout == v.stdout


def test_every_option_has_help_and_a_human_metavar() -> None:
    import click
    import typer.main

    from gpupas.cli.app import app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"gpupas {name} {p.opts}: no help text"
            text = cmd.get_help(ctx)
            assert "<list" not in text and "<str>" not in text and "<path>" not in text, (name, text)
    for p in group.params:
        assert not isinstance(p, click.Option) or p.help, p.opts


def test_piped_tables_are_never_cut(arc: Path) -> None:
    piped = gp("-A", arc, "log").stdout  # no terminal, no COLUMNS: the full line
    assert "a long message " + "x" * 150 in piped
    assert "…" not in piped and "..." not in piped


def test_quiet_prints_only_what_was_asked(arc: Path, tmp_path: Path) -> None:
    quiet = gp("-q", "-A", arc, "tag", "t", "1")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    assert gp("-q", "-A", arc, "tag").stdout.strip() == "t\t1"  # requested data still prints


def test_tag_list_gc_dry_run_and_diff_top(arc: Path, tmp_path: Path) -> None:
    none = gp("-A", arc, "tag")
    assert none.returncode == 0 and "no tags yet" in none.stderr
    planted = arc / "snapshots" / "orphan.0badf00d" / "zstd" / "c"
    planted.mkdir(parents=True)
    (planted / "0").write_bytes(b"x" * 1000)
    dry = gp("-A", arc, "gc", "--dry-run", "--min-age", "0")
    assert dry.returncode == 0 and "would remove folder orphan.0badf00d (1000 B)" in dry.stdout
    assert planted.exists()
    assert "removed folder orphan.0badf00d" in gp("-A", arc, "gc", "--min-age", "0").stdout
    assert not planted.exists()
    with gpupas.open_repository(arc) as repo:
        repo.commit("wide", {f"t{i}": np.ones(4, np.float32) for i in range(8)})
    top = gp("-A", arc, "diff", "1", "3", "--top", "2")
    assert top.returncode == 0 and top.stdout.count("+ tensor t") == 2 and "and 6 more added" in top.stdout


def test_directory_commit_says_what_it_left_out(tmp_path: Path) -> None:
    from gpupas.integrations.safetensors import save_file

    run = tmp_path / "run"
    run.mkdir()
    save_file(tensors(0), run / "step-1.safetensors")
    (run / "notes.txt").write_text("hello")
    gp("init", tmp_path / "arc")
    res = gp("-A", tmp_path / "arc", "commit", run, "-n", "r")
    assert res.returncode == 0 and "warning:" in res.stderr and "notes.txt" in res.stderr


def test_a_failed_checkout_leaves_no_folder(arc: Path, tmp_path: Path) -> None:
    for shard in (arc / "snapshots").rglob("c/0"):  # every snapshot's: whichever version 1 reads
        data = bytearray(shard.read_bytes())
        data[10] ^= 0xFF
        shard.write_bytes(bytes(data))
    res = gp("-A", arc, "checkout", "1", "-o", tmp_path / "out")
    assert res.returncode == 3 and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_torch_hint_names_a_cpu_build() -> None:
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def fake(name, *a, **k):\n    if name == 'torch': raise ImportError('no torch')\n"
            "    return real(name, *a, **k)\nbuiltins.__import__ = fake\n"
            "from gpupas.integrations.torch import _torch\ntry:\n    _torch()\nexcept ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert "download.pytorch.org/whl/cpu" in out and "gpupas[torch]" not in out


# -- checkpoint layouts --------------------------------------------------------------------------------------------
def test_a_checkpoint_file_is_held_to_the_names_a_mapping_is(tmp_path: Path) -> None:
    from gpupas.integrations.safetensors import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"": np.ones(2, np.float32), "a": np.ones(2, np.float32)}, path)
    with gpupas.create_archive(tmp_path / "arc") as a, pytest.raises(gpupas.InvalidInputError,
                                                                     match="non-empty string"):
        a.commit(path)


def test_a_file_that_is_not_what_its_name_says_is_called_what_it_is(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    from gpupas.integrations.safetensors import save_file

    st, pt, npz, txt = (tmp_path / n for n in ("st.pt", "pt.safetensors", "arrays.pt", "notes.bin"))
    save_file({"w": np.ones(3, np.float32)}, st)
    torch.save({"w": torch.ones(3)}, pt)
    np.savez(tmp_path / "arrays.npz", w=np.ones(3, np.float32))
    (tmp_path / "arrays.npz").rename(npz)
    txt.write_text("step,loss\n1,0.5\n")
    want = {st: "is a safetensors file, not a torch checkpoint; rename it to end in .safetensors",
            pt: "is a torch checkpoint, not a safetensors file; rename it to end in .pt",
            npz: "is a NumPy .npz archive, not a torch checkpoint; load it with numpy.load",
            txt: "is a text file, not a torch checkpoint"}
    with gpupas.create_archive(tmp_path / "arc") as a:
        for path, words in want.items():
            with pytest.raises(gpupas.InvalidInputError, match=re.escape(words)):
                a.commit(path)


torch = pytest.importorskip("torch")


def _state(seed: int = 0) -> dict[str, object]:
    return {k: torch.from_numpy(v.copy()) for k, v in tensors(seed).items()}


@pytest.mark.parametrize("layout", ["plain", "model", "model_state_dict", "state_dict", "lightning", "ddp",
                                    "module-prefix-in-model", "compiled", "ddp-of-compiled", "compiled-in-model"])
def test_training_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    sd = _state()
    obj: object = {
        "plain": sd,
        "model": {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {}, "step": 10},
        "state_dict": {"state_dict": sd, "hyper_parameters": {"lr": 1e-3}},
        "lightning": {"state_dict": sd, "optimizer_states": [{}], "lr_schedulers": [], "epoch": 1,
                      "global_step": 100, "pytorch-lightning_version": "2.4.0"},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "module-prefix-in-model": {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile's OptimizedModule
        "ddp-of-compiled": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        "compiled-in-model": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "epoch": 2},
    }[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    with gpupas.create_repository(tmp_path / "arc") as repo, pytest.warns() if layout != "plain" else _no_warning():
        v = repo.commit("m", path)  # (a file's 'module.' prefix is taken off, and said)
        got = repo.restore(v.id)
    assert sorted(got) == sorted(sd) and all(got[k].tobytes() == sd[k].numpy().tobytes() for k in sd)
    with gpupas.create_archive(tmp_path / "mem") as a, pytest.warns() if layout != "plain" else \
            _no_warning():  # the same object in memory: the same weights and names, the same warning
        got = a.restore(a.commit(obj).id)
    assert sorted(got) == sorted(sd) and all(got[k].tobytes() == sd[k].numpy().tobytes() for k in sd)



def test_a_compiled_models_checkpoints_are_deltas_on_the_plain_models(tmp_path: Path) -> None:
    """torch.compile's module names every tensor ``_orig_mod.<name>`` and its layers likewise: a fine-tune of a
    compiled copy of a committed model names them as the model does, so its snapshot is a delta on the model's
    and its network the model's layers, not a copy stored whole under other names."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    compiled = torch.compile(model)  # (nothing compiles until it is called)
    with gpupas.create_repository(tmp_path / "arc") as repo:
        v1 = repo.commit("base", model.state_dict(), network=model)
        with torch.no_grad():
            model[0].weight[:2] += 1e-3  # a fine-tune's step: two rows change
        with pytest.warns(UserWarning, match="_orig_mod"):
            hook = gpupas.CheckpointHook(repo, "ft", model=compiled, parents=[v1.id])
            v2 = hook(compiled, step=1)
        hook.close()
        m = repo.archive.manifest(v2.latest)
        assert m.base == v1.latest and sorted(e.name for e in m.tensors) == sorted(model.state_dict())
        assert all(e.reads_base for e in m.tensors), [(e.name, e.enc) for e in m.tensors]
        assert {n["name"] for n in repo.version(v2.id).record["network"]["nodes"]} >= {"0", "1", "2"}
        got = repo.restore(v2.id)
        assert all(got[k].tobytes() == t.numpy().tobytes() for k, t in model.state_dict().items())
    plain = gpupas.network.extract_network(model).to_dict()["nodes"]
    for wrapped in (torch.nn.DataParallel(compiled), torch.compile(torch.nn.DataParallel(model))):
        assert gpupas.network.extract_network(wrapped).to_dict()["nodes"] == plain


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)


def test_a_checkpoint_without_weights_says_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "opt.pt"
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, path)
    with gpupas.create_repository(tmp_path / "arc") as repo, pytest.raises(gpupas.InvalidInputError,
                                                                          match=r"holds no tensors.*optimizer"):
        repo.commit("m", path)
    with gpupas.create_archive(tmp_path / "mem") as a, pytest.raises(gpupas.InvalidInputError,
                                                                     match=r"holds no tensors.*state, param_groups"):
        a.commit(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1).state_dict())


def test_hugging_face_folders_sharded_and_not(tmp_path: Path) -> None:
    from gpupas.integrations.safetensors import save_file

    sd = tensors(0) | {"emb.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
    sharded = tmp_path / "run" / "checkpoint-500"
    sharded.mkdir(parents=True)
    save_file({k: sd[k] for k in ("fc.weight",)}, sharded / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in ("fc.bias", "emb.weight")}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {"fc.weight": "model-00001-of-00002.safetensors", "fc.bias": "model-00002-of-00002.safetensors",
                  "emb.weight": "model-00002-of-00002.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "trainer_state.json").write_text("{}")
    single = tmp_path / "run" / "checkpoint-1000"
    single.mkdir()
    torch.save({k: torch.from_numpy(v + 1) for k, v in sd.items()}, single / "pytorch_model.bin")
    with gpupas.create_repository(tmp_path / "arc") as repo:
        v = repo.commit("hf", tmp_path / "run")  # a training run's folder of checkpoint folders
        assert [s["source"] for s in v.snapshots] == ["checkpoint-500", "checkpoint-1000"]
        assert [s["step"] for s in v.snapshots] == [500, 1000]
        first, last = repo.restore(v.id, 1), repo.restore(v.id)
        assert all(first[k].tobytes() == sd[k].tobytes() for k in sd)
        assert all(last[k].tobytes() == (sd[k] + 1).tobytes() for k in sd)
        one = repo.commit("hf-one", sharded)  # one model folder: one snapshot
        assert len(one.snapshots) == 1
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with gpupas.open_repository(tmp_path / "arc") as repo, pytest.raises(gpupas.InvalidInputError, match="outside"):
        repo.commit("evil", sharded)



def test_a_hugging_face_cache_snapshot_of_linked_shards(tmp_path: Path) -> None:
    """A model folder of Hugging Face's cache (snapshots/<rev>/ holds links to ../../blobs/<hash>) commits as its
    files read; it was refused as "names a shard outside its folder", the links' targets judged, not the names."""
    from gpupas.integrations.safetensors import save_file

    sd = tensors(0)
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file({"fc.weight": sd["fc.weight"]}, blobs / "1f0e")
    save_file({"fc.bias": sd["fc.bias"]}, blobs / "2c9d")
    weight_map = {"fc.weight": "model-00001-of-00002.safetensors", "fc.bias": "model-00002-of-00002.safetensors"}
    (blobs / "3a7b").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, blob in [("model-00001-of-00002.safetensors", "1f0e"), ("model-00002-of-00002.safetensors", "2c9d"),
                       ("model.safetensors.index.json", "3a7b")]:
        (snap / name).symlink_to(Path("..", "..", "blobs", blob))
    with gpupas.create_repository(tmp_path / "arc") as repo:
        v = repo.commit("cached", snap)
        assert {k: a.tobytes() for k, a in repo.restore(v.id).items()} == {k: a.tobytes() for k, a in sd.items()}
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "sub/../../blobs/1f0e"}}))
    with gpupas.open_repository(tmp_path / "arc") as repo, pytest.raises(gpupas.InvalidInputError, match="outside"):
        repo.commit("evil", snap)


def test_a_shard_index_given_as_the_checkpoint(tmp_path: Path) -> None:
    """The index file of a sharded checkpoint (what a user points at: `gpupas commit .../model.safetensors.index.json`)
    reads as its folder does; it was refused as "unknown checkpoint type '.json'", in the API and the CLI alike. A
    shard the index names but the folder lacks is said as such, naming the index."""
    from gpupas.integrations.safetensors import save_file

    sd = tensors(0)
    model = tmp_path / "checkpoint-700"
    model.mkdir()
    save_file({"fc.weight": sd["fc.weight"]}, model / "model-00001-of-00002.safetensors")
    save_file({"fc.bias": sd["fc.bias"]}, model / "model-00002-of-00002.safetensors")
    weight_map = {"fc.weight": "model-00001-of-00002.safetensors", "fc.bias": "model-00002-of-00002.safetensors"}
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 8448}, "weight_map": weight_map}))
    torch.save({k: torch.from_numpy(v + 1) for k, v in sd.items()}, model / "pytorch_model.bin")
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(sd,
                                                                                             "pytorch_model.bin")}))
    assert {k: v.tobytes() for k, v in gpupas.load_checkpoint(index).items()} == {k: v.tobytes() for k, v in sd.items()}
    bins = gpupas.load_checkpoint(model / "pytorch_model.bin.index.json")  # the index named, not the folder's first
    assert {k: v.tobytes() for k, v in bins.items()} == {k: (v + 1).tobytes() for k, v in sd.items()}
    with gpupas.create_repository(tmp_path / "arc") as repo:
        v = repo.commit("idx", index)
        assert v.snapshots[0]["step"] == 700  # the folder's step, as for the folder itself
        assert all(repo.restore(v.id)[k].tobytes() == sd[k].tobytes() for k in sd)
    res = gp("commit", index, "-n", "cli", "-A", tmp_path / "arc")
    assert res.returncode == 0, res.stderr
    (model / "model-00002-of-00002.safetensors").unlink()
    res = gp("commit", index, "-n", "gone", "-A", tmp_path / "arc")
    assert res.returncode == 2 and "names shard 'model-00002-of-00002.safetensors'" in res.stderr, res.stderr


def test_a_gzipped_or_garbled_checkpoint_is_not_said_to_pickle_objects(tmp_path: Path) -> None:
    """A gzip'd checkpoint (a .pt, a .safetensors, a .pt.gz) is named as gzip with "decompress it first"; a .pt of
    bytes that are no pickle as damaged. Both read "it pickles Python objects ...; save model.state_dict()", torch's
    "Unsupported operand" taken for an object it would not load."""
    import gzip

    plain = tmp_path / "plain.pt"
    torch.save({k: torch.from_numpy(v) for k, v in tensors(0).items()}, plain)
    packed = gzip.compress(plain.read_bytes())
    with gpupas.create_repository(tmp_path / "arc") as repo:
        for name in ("model.pt", "model.safetensors", "model.pt.gz"):
            (tmp_path / name).write_bytes(packed)
            with pytest.raises(gpupas.InvalidInputError, match=r"gzip-compressed file.*decompress it first"):
                repo.commit("m", tmp_path / name)
        (tmp_path / "noise.pt").write_bytes(bytes(range(3, 256)) * 4)
        with pytest.raises(gpupas.InvalidInputError) as err:
            repo.commit("m", tmp_path / "noise.pt")
        assert "not a pickle" in str(err.value) and "Python objects" not in str(err.value), err.value


@pytest.mark.parametrize("held", ["tensor", "list"])
def test_a_torch_file_of_one_tensor_or_a_list_says_what_to_save(tmp_path: Path, held: str) -> None:
    """A .pt of one tensor (torch.save(t, path)) or of a list of them is refused naming the file and what to save
    instead; it said only what it held."""
    path = tmp_path / "t.pt"
    t = torch.arange(6.0)
    torch.save(t if held == "tensor" else [t, t + 1], path)
    with gpupas.create_repository(tmp_path / "arc") as repo, pytest.raises(gpupas.InvalidInputError) as err:
        repo.commit("m", path)
    assert str(path) in str(err.value) and "save its tensors by name" in str(err.value), err.value


def test_entries_left_out_of_a_torch_file_are_named(tmp_path: Path) -> None:
    """What a torch file's dict holds besides its tensors is named in the warning, and a nested dict of tensors is
    said to hold tensors; the warning said "left out 1 entries that are not tensors" of them, naming none."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "ema": {"w": torch.zeros(2)}, "step": 7}, path)
    with gpupas.create_repository(tmp_path / "arc") as repo, pytest.warns(UserWarning) as caught:
        assert set(repo.restore(repo.commit("m", path).id)) == {"w"}
    said = " ".join(str(w.message) for w in caught)
    assert "left out 2 entries" in said and "ema, step" in said and "ema holds tensors of its own" in said, said
    torch.save({"state_dict": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}, "step": 7}, path)  # wrapped
    with gpupas.create_repository(tmp_path / "arc2") as repo, pytest.warns(UserWarning) as caught:
        assert set(repo.restore(repo.commit("m", path).id)) == {"w"}
    said = " ".join(str(w.message) for w in caught)
    assert "under 'state_dict'" in said and "ema holds tensors of its own" in said, said


def test_a_dynamically_quantized_state_dict_is_refused_naming_its_packed_weights(tmp_path: Path) -> None:
    """torch.ao dynamic int8 quantization keeps a Linear's weights as a (qint8 weight, bias) tuple under
    ``_packed_params._packed_params``. From a file its commit stored the scale and zero point alone (the weights
    "left out" as "not tensors", with a warning); wrapped in a training checkpoint it was told to save
    model.state_dict(), which it was; in memory it was told a dtype entry is not a tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of its eager quantization
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 4)), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    state = q.state_dict()
    torch.save(state, tmp_path / "q.pt")
    with gpupas.create_archive(tmp_path / "arc") as a:
        for src in (tmp_path / "q.pt", state, {"model": state, "epoch": 3}):
            with pytest.raises(gpupas.UnsupportedDtypeError, match=r"'0\._packed_params\._packed_params'.*quantized"
                                                                    r".*dequantize"):
                a.commit(src)
        assert a.snapshots() == []


@pytest.mark.parametrize("legacy", [False, True])
def test_a_torch_file_cut_short_is_said_to_be(tmp_path: Path, legacy: bool) -> None:
    """A torch.save file cut short (an interrupted save or download) is named with what to do: a cut zip file read
    "[Errno 22] Invalid argument" (torch's own OSError), as if the path were at fault, or miniz's "failed finding
    central directory"; a legacy pickle "index out of range" or "EOFError". Nothing is written."""
    path = tmp_path / "step-100.pt"
    torch.save({k: torch.from_numpy(v) for k, v in tensors(0).items()}, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    with gpupas.create_repository(tmp_path / "arc") as repo:
        for cut in (len(data) // 2, len(data) - 30):
            path.write_bytes(data[:cut])
            with pytest.raises(gpupas.InvalidInputError) as err:
                repo.commit("m", path)
            msg = str(err.value)
            assert str(path) in msg and "save or download it again" in msg and "Errno" not in msg, msg
            assert legacy or "cut short" in msg
        assert repo.log() == []


def test_tied_weights_and_views_come_back_as_separate_tensors(tmp_path: Path) -> None:
    """Tied weights (one storage under two names, as torch.save keeps them) and a view into a larger storage come back
    as separate tensors with the same names, dtypes and bits, in a restore, a torch export and a safetensors export
    (which could not hold them shared), and load into the tied model (README, export's docstring)."""
    from safetensors.torch import load_file

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.lm_head = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False)
            self.lm_head.weight = self.embed.weight

    model, big = Tied(), torch.arange(64, dtype=torch.float32)
    sd = model.state_dict() | {"window": big[8:24].view(4, 4)}
    torch.save(sd, tmp_path / "tied.pt")
    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("tied", tmp_path / "tied.pt")
        outs = [repo.restore("tied", framework="torch"), load_file(repo.export("tied", tmp_path / "t.safetensors")),
                torch.load(repo.export("tied", tmp_path / "t.pt"), weights_only=True)]
    for got in outs:
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) and got[k].dtype == sd[k].dtype for k in sd)
        got.pop("window")
        again = Tied()
        again.load_state_dict(got)
        assert again.lm_head.weight is again.embed.weight and torch.equal(again.embed.weight, model.embed.weight)


def test_a_tensor_gpupas_does_not_store_names_its_file(tmp_path: Path) -> None:
    """A tensor of a torch file that cannot be archived (complex, sparse, on the meta device) is refused naming the
    file it is in, as a safetensors file's is: it said only "tensor 'w': ...", which in a folder of 30 shards (or a
    run of 100 checkpoints) does not say where to look."""
    model = tmp_path / "model"
    model.mkdir()
    torch.save({"a": torch.ones(2)}, model / "pytorch_model-00001-of-00002.bin")
    bad = model / "pytorch_model-00002-of-00002.bin"
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "w": bad.name}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with gpupas.create_repository(tmp_path / "arc") as repo:
        for w, why in ((torch.ones(2, dtype=torch.complex64), "complex64"), (torch.eye(2).to_sparse(), "sparse"),
                       (torch.empty(2, device="meta"), "meta device")):
            torch.save({"w": w}, bad)
            with pytest.raises(gpupas.UnsupportedDtypeError, match=why) as err:
                repo.commit("m", model)
            assert str(err.value).startswith(f"{bad}: tensor 'w'"), err.value
        with pytest.raises(gpupas.UnsupportedDtypeError) as err:
            repo.commit("m", {"w": np.ones(2, np.complex64)})  # in memory: no file to name
        assert str(err.value).startswith("tensor 'w'"), err.value


def test_shards_without_their_index_are_refused(tmp_path: Path) -> None:
    """A folder of a sharded model's shards whose index was not copied was read as a folder of checkpoints: each shard
    a snapshot of its own (each a part of the model, both at "step 2" from "-of-00002"). It is refused, saying what
    is missing; nothing is written."""
    from gpupas.integrations.safetensors import save_file

    model = tmp_path / "model"
    model.mkdir()
    for i, (k, v) in enumerate(tensors(0).items()):
        save_file({k: v}, model / f"model-{i + 1:05d}-of-00002.safetensors")
    with gpupas.create_repository(tmp_path / "arc") as repo:
        for call in (lambda: repo.commit("m", model), lambda: repo.import_folder(model, "chain")):
            with pytest.raises(gpupas.InvalidInputError, match=r"shards of a model .*without their index"):
                call()
        assert repo.log() == []


def test_an_npz_or_a_renamed_torch_file_says_what_to_do(tmp_path: Path) -> None:
    """A file whose suffix is no checkpoint's but whose bytes say what it is (arrays saved with numpy.savez, a torch
    file named .pt2) is refused with what to do, as one misnamed .safetensors or .pt is: it said only "unknown
    checkpoint type '.npz'", in the API and the CLI, leaving a NumPy user no way to commit from the command line."""
    np.savez(tmp_path / "w.npz", w=np.arange(6, dtype=">f4").reshape(2, 3))
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt2")
    with gpupas.create_repository(tmp_path / "arc") as repo:
        for name, says in (("w.npz", "NumPy .npz archive; load it with numpy.load"),
                           ("w.pt2", "rename it to end in .pt")):
            with pytest.raises(gpupas.InvalidInputError, match=re.escape(says)):
                gpupas.load_checkpoint(tmp_path / name)
            with pytest.raises(gpupas.InvalidInputError, match=re.escape(says)):
                repo.commit("m", tmp_path / name)
            res = gp("commit", tmp_path / name, "-n", "m", "-A", tmp_path / "arc")
            assert res.returncode == 2 and says in res.stderr.replace("\n", " "), res.stderr

# -- gc after a killed commit ----------------------------------------------------------------------------------------
def test_gc_after_a_killed_cli_commit(tmp_path: Path) -> None:
    from gpupas.integrations.safetensors import save_file

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        save_file({"w": (rng.standard_normal((512, 512)) * 0.02).astype(np.float32)}, run / f"step-{i}.safetensors")
    arc = tmp_path / "arc"
    gp("init", arc)
    gp("-A", arc, "commit", run / "step-0.safetensors", "-n", "kept")
    env = {k: v for k, v in os.environ.items() if k != "GPUPAS_ARCHIVE"}
    code = ("import sys, time\nfrom gpupas.versions import records\nreal = records.Records.publish_version\n"
            "def slow(self, rec):\n    print('publishing', flush=True)\n    time.sleep(60)\n"
            "records.Records.publish_version = slow\nfrom gpupas.cli import main\n"
            f"sys.argv = ['gpupas', '-A', {str(arc)!r}, 'commit', {str(run)!r}, '-n', 'killed']\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "publishing"  # every snapshot written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with gpupas.open_repository(arc) as repo:
        assert [v.name for v in repo.versions()] == ["kept"]
        assert len(repo.archive.snapshots()) == 7  # the killed commit's six snapshots, complete but unreferenced
        assert repo.gc(min_age=3600) == []  # young: could be a commit still in progress
        dry = repo.gc(min_age=0, dry_run=True)
        assert [r["kind"] for r in dry] == ["snapshot"] * 6 and all(r["bytes"] > 0 for r in dry)
        removed = repo.gc(min_age=0)
        assert sorted(r["name"] for r in removed) == sorted(r["name"] for r in dry)
        assert len(repo.archive.snapshots()) == 1 and repo.verify()["ok"]
        assert repo.restore("kept")["w"].shape == (512, 512)
    time.sleep(0)  # (nothing else left running)


def test_archive_commit_of_a_path_says_what_it_left_out(tmp_path: Path) -> None:
    """A training checkpoint holds more than weights: Archive.commit(path) archives the weights and warns
    about the rest (optimizer state, EMA weights), as Repository.commit does."""
    sd = {k: torch.from_numpy(v) for k, v in tensors(0).items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "optimizer": {"state": {}}, "ema": sd, "epoch": 3}, path)
    with gpupas.create_archive(tmp_path / "arc") as a, pytest.warns(UserWarning, match=r"optimizer.*ema|ema.*opt"):
        m = a.commit(path)
    assert sorted(t.name for t in m.tensors) == sorted(sd)


def test_restored_empty_torch_tensors_are_plainly_strided(tmp_path: Path) -> None:
    """torch.from_numpy gives an empty tensor strides of 0, which .view(dtype) refuses; a restore's are
    those of torch.empty."""
    state = {"h": torch.empty(0, 5, dtype=torch.float16), "b": torch.empty(3, 0, dtype=torch.bfloat16)}
    with gpupas.create_archive(tmp_path / "arc") as a:
        got = a.restore(a.commit(state).id, framework="torch")
    for k, t in state.items():
        assert got[k].shape == t.shape and got[k].dtype == t.dtype and got[k].stride() == t.stride(), k
        assert got[k].view(torch.uint8).shape == t.view(torch.uint8).shape


def test_odd_tensors_are_refused_by_name_or_kept_whole(tmp_path: Path) -> None:
    """What a state_dict can hold besides plain tensors: a torch.Tensor subclass is a tensor; a module's
    extra state is left out with a warning; a dtype NumPy lacks, a quantized tensor and a masked array are
    refused naming the tensor."""

    class Tagged(torch.Tensor):  # e.g. a library's parameter class
        pass

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with gpupas.create_archive(tmp_path / "arc") as a:
        got = a.restore(a.commit({"w": w.as_subclass(Tagged)}).id)
        assert got["w"].tobytes() == w.numpy().tobytes()
        with pytest.warns(UserWarning, match="extra state"):
            m = a.commit({"w": w, "norm._extra_state": {"scale": 2.0}, "q._extra_state": None})
        assert [t.name for t in m.tensors] == ["w"]
        ckpt = {"model": {"w": w, "norm._extra_state": {"scale": 2.0}}, "optimizer": {"state": {}}, "epoch": 3}
        torch.save(ckpt, tmp_path / "ckpt.pt")
        for src in (ckpt, tmp_path / "ckpt.pt"):  # inside a training checkpoint, in memory or from a file
            with pytest.warns(UserWarning, match="extra state"):
                assert [t.name for t in a.commit(src).tensors] == ["w"]
        state = {f"t{i}": w for i in range(5)} | {"odd": torch.zeros(3, dtype=torch.complex64)}
        with pytest.raises(gpupas.UnsupportedDtypeError, match=r"tensor 'odd'.*complex64"):
            a.commit(state)
        qt = torch.quantize_per_tensor(w, 0.1, 0, torch.quint8)
        with pytest.raises(gpupas.UnsupportedDtypeError, match=r"tensor 'q'.*int_repr"):
            a.commit({"q": qt})
        masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
        with pytest.raises(gpupas.InvalidInputError, match=r"'m' is a masked array"):
            a.commit({"m": masked})
        plain = np.ma.masked_array([1.0, 2.0])  # nothing masked: its values are the array
        assert a.restore(a.commit({"m": plain}).id)["m"].tolist() == [1.0, 2.0]



def test_a_sharded_dtensor_is_refused_naming_how_to_give_whole_weights(tmp_path: Path) -> None:
    """FSDP2's fully_shard and tensor parallelism give DTensors (one shard per rank): the refusal names the
    whole tensor and the full state_dict to give instead."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        d = distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        with gpupas.create_archive(tmp_path / "arc") as a, \
                pytest.raises(gpupas.UnsupportedDtypeError, match=r"full_tensor\(\).*full_state_dict=True"):
            a.commit({"w": d})
    finally:
        dist.destroy_process_group()


def test_conjugate_and_negative_views_are_archived_as_their_values(tmp_path: Path) -> None:
    """torch's lazy views (``c.conj().imag`` has the negative bit set, ``c.conj()`` the conjugate bit): the
    values they show are archived, and a complex one is refused as complex, naming the tensor."""
    c = torch.complex(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.25, -4.0]))
    imag, one = c.conj().imag, c[:1].conj().imag  # what "complex: store .real and .imag" gives for a conjugate
    assert imag.is_neg() and one.is_neg() and one.is_contiguous()
    with gpupas.create_archive(tmp_path / "arc") as a:
        got = a.restore(a.commit({"im": imag, "one": one, "re": c.conj().real}).id, framework="torch")
        assert got["im"].tolist() == [-3.0, -0.25, 4.0] and got["re"].tolist() == [1.0, -2.0, 0.5]
        assert got["one"].tolist() == [-3.0] and not got["one"].is_neg()
        with pytest.raises(gpupas.UnsupportedDtypeError, match=r"tensor 'c'.*complex64.*\.real and \.imag"):
            a.commit({"c": c.conj()})
        assert len(a.snapshots()) == 1


def test_a_nested_tensor_is_refused_naming_how_to_store_its_tensors(tmp_path: Path) -> None:
    """A nested tensor (torch.nested, strided or jagged) is refused naming the tensor and how to store its parts:
    a strided one was "a Tensor tensor" with torch's internal "NestedTensorImpl doesn't support sizes. Please file
    an issue", a jagged one told to store ``t.to_dense()`` (it has none) or "its indices and values" (a sparse
    tensor's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: the strided nested layout is a prototype
        parts = [torch.ones(2), torch.arange(3.0)]
        nested = {"strided": torch.nested.nested_tensor(parts), "jagged": torch.nested.nested_tensor(
            parts, layout=torch.jagged)}
    with gpupas.create_archive(tmp_path / "arc") as a:
        for t in nested.values():
            with pytest.raises(gpupas.UnsupportedDtypeError, match=r"tensor 'n': a nested tensor.*unbind\(\)") as err:
                a.commit({"w": torch.ones(2), "n": t})
            assert "Please file" not in str(err.value) and "to_dense" not in str(err.value)
        assert a.snapshots() == []


def test_a_dtype_this_torch_lacks_is_refused_by_name_on_a_torch_restore(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch older than the archive's dtypes (torch>=2.2 is allowed: no float8_e8m0fnu before 2.7, no uint16
    before 2.3): restore(framework="torch") and a torch export refuse naming the tensor, its dtype and the remedy,
    and the export writes nothing (not torch.from_numpy's TypeError)."""
    from gpupas.integrations.torch import _views

    monkeypatch.delitem(_views(), torch.float8_e8m0fnu)  # as an older torch: no such dtype
    scales = np.array([1.0, 2.0, 0.5], dtype=ml_dtypes.float8_e8m0fnu)
    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("m", {"w": np.ones(2, np.float32), "scales": scales})
        with pytest.raises(gpupas.UnsupportedDtypeError, match=r"tensor 'scales'.*float8_e8m0fnu.*numpy"):
            repo.restore("m", framework="torch")
        with pytest.raises(gpupas.UnsupportedDtypeError, match=r"tensor 'scales'.*float8_e8m0fnu"):
            repo.export("m", tmp_path / "m.pt")
        assert sorted(os.listdir(tmp_path)) == ["arc"]
        assert repo.restore("m")["scales"].tobytes() == scales.tobytes()


def test_export_to_a_folder_is_refused_and_writes_nothing(arc: Path, tmp_path: Path) -> None:
    """`export -o out/` (a trailing slash: a folder, as cp and rsync read it) or an existing folder: refused by
    name, whether or not --force is given, not a file named `out` (or "exists, use --force" and then refused)."""
    (tmp_path / "there").mkdir()
    for out, extra in ((f"{tmp_path / 'new'}/", ()), (tmp_path / "there", ()), (tmp_path / "there", ("--force",))):
        res = gp("-A", arc, "export", "1", "-o", out, *extra)
        assert res.returncode == 2 and f"{out} {'names' if out == f'{tmp_path}/new/' else 'is'} a folder" in res.stderr
        assert "checkout" in res.stderr, res.stderr
    assert not (tmp_path / "new").exists() and not any((tmp_path / "there").iterdir())


def test_an_output_under_a_file_or_where_nothing_can_be_written_is_named(arc: Path, tmp_path: Path) -> None:
    """export or checkout under a path that is a file, or where no folder can be made: the error names the path
    asked for (not a temporary one, not "[Errno 17] ... File exists"), and nothing is written."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for cmd, out in (("export", notes / "m.safetensors"), ("export", notes / "a" / "m.safetensors"),
                     ("checkout", notes / "co")):
        res = gp("-A", arc, cmd, "1", "-o", out)
        assert res.returncode == 2 and f"{notes} is a file, not a folder" in res.stderr and str(out) in res.stderr
        assert ".tmp" not in res.stderr and "Errno" not in res.stderr
    for cmd, out in (("export", "/proc/m.safetensors"), ("checkout", "/proc/co")):  # (no folder made there, root too)
        res = gp("-A", arc, cmd, "1", "-o", out)
        assert res.returncode == 4 and res.stderr.startswith(f"error: cannot write {out}: "), res.stderr
        assert ".tmp" not in res.stderr and "Errno" not in res.stderr
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["arc", "notes.txt"]


def test_a_full_disk_during_an_export_names_the_file(arc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    """An export that runs out of space names the file it was writing (it said "[Errno 28] No space left on
    device", naming nothing) and leaves no temporary file."""
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out" / "m.safetensors"
    with gpupas.open_repository(arc) as repo:
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError, match=rf"cannot write {re.escape(str(out))}: No space left") as got:
            repo.export(1, out)
        monkeypatch.undo()
    assert got.value.errno == errno.ENOSPC and not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_a_disk_full_while_writing_names_the_file_in_either_format(arc: Path, tmp_path: Path, name: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch export that ran out of space mid-write said "unexpected RuntimeError: [enforce fail at
    inline_container.cc:672] . unexpected pos 3648 vs 3542; please report it" (torch's writer hides the OSError
    under its own error): now, as for safetensors, "cannot write FILE: No space left on device", nothing left."""
    import errno
    import io

    if name.endswith(".pt"):
        pytest.importorskip("torch")

    class Full(io.FileIO):  # the disk fills up after the first write
        def write(self, b: object) -> int:
            if self.tell():
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)  # type: ignore[arg-type]

    real = os.fdopen
    out = tmp_path / "out" / name
    with gpupas.open_repository(arc) as repo:
        monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: Full(fd, "wb") if mode == "wb" else
                            real(fd, mode, *a, **k))
        with pytest.raises(OSError, match=rf"^\[Errno 28\] cannot write {re.escape(str(out))}: No space left"):
            repo.export(1, out)
        monkeypatch.undo()
    assert not any((tmp_path / "out").iterdir())


def test_a_full_disk_during_a_checkout_names_the_folder_asked_for(arc: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout into a new folder is written in a temporary one, then renamed: a full disk said "cannot write
    .../.out.6f1c...tmp/model.safetensors: No space left on device", a folder the user never named and that is
    gone by then. Now the path asked for: "cannot write .../out/model.safetensors"."""
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    with gpupas.open_repository(arc) as repo:
        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError, match=rf"cannot write {re.escape(str(out / 'model.safetensors'))}: No space") \
                as got:
            repo.checkout(1, out)
        monkeypatch.undo()
    assert got.value.errno == errno.ENOSPC and ".tmp" not in str(got.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arc"]


def test_an_output_with_a_long_legal_name_is_written(arc: Path, tmp_path: Path) -> None:
    """A file or folder name of 240 bytes (the limit is 255) could not be exported or checked out to: "cannot write
    ...: File name too long", for the temporary name beside it (the name, a dot, 32 hex digits, .tmp)."""
    name = "m" * 228 + ".safetensors"
    assert len(name) == 240
    res = gp("-A", arc, "export", "1", "-o", tmp_path / name)
    assert res.returncode == 0, res.stderr
    assert gpupas.tensors.load_checkpoint(tmp_path / name)["fc.bias"].shape == (64,)
    res = gp("-A", arc, "checkout", "1", "-o", tmp_path / ("c" * 240))
    assert res.returncode == 0 and (tmp_path / ("c" * 240) / "model.safetensors").is_file(), res.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_checkout_into_an_empty_folder_leaves_it_empty(arc: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`mkdir out; gpupas checkout 1 -o out` (help: "empty or new") that failed after the weights (a full disk at
    gpupas-version.json) left out/model.safetensors without its metadata, and a rerun was refused: "out is not
    empty". Now what it wrote is taken back, as a new folder is, and a rerun writes the checkout whole."""
    import errno

    calls = []

    def full_the_second_time(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    out.mkdir()
    with gpupas.open_repository(arc) as repo:
        monkeypatch.setattr(os, "fsync", full_the_second_time)
        with pytest.raises(OSError, match="No space left"):
            repo.checkout(1, out)
        monkeypatch.undo()
        assert out.is_dir() and not any(out.iterdir())
        assert [p.name for p in repo.checkout(1, out)] == ["model.safetensors", "gpupas-version.json"]


def test_outputs_inside_the_archive_or_a_tier_are_refused(arc: Path, tmp_path: Path) -> None:
    """export or checkout into the archive's own folder (or a tier's): refused, nothing written. A file put in
    manifests/ read as a damaged snapshot (verify: exit 3), a checkout there made 'gpupas-version' a snapshot, and
    `export -o ARCHIVE/zarr.json --force` left an archive that no command could open."""
    with gpupas.open_repository(arc) as repo:
        repo.archive.add_tier("cold", tmp_path / "cold")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "catalog.sqlite")
    for cmd, out in (("export", arc / "zarr.json"), ("export", arc / "manifests" / "9.json"),
                     ("checkout", arc / "manifests"), ("checkout", arc), ("checkout", arc / "new"),
                     ("export", tmp_path / "cold" / "m.safetensors")):
        res = gp("-A", arc, cmd, "1", "-o", out, "--force")
        assert res.returncode == 2 and f"{out} is in (or is) the " in res.stderr, (cmd, out, res.stderr)
    res = gp("-A", ".", "export", "1", "-o", "m.safetensors", cwd=arc)  # a relative path: the same
    assert res.returncode == 2 and "m.safetensors is in (or is) the archive at ." in res.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != "catalog.sqlite") == before
    assert gp("-A", arc, "verify").returncode == 0
    assert gp("-A", arc, "export", "1", "-o", tmp_path / "m.safetensors").returncode == 0  # outside: written


def test_quiet_after_the_command_as_before_it(arc: Path) -> None:
    """`gpupas verify -q` (where users type it) was "No such option: -q" (exit 2): --quiet/-q was taken only
    before the command. Now after it too, for every command, its arguments kept."""
    for args in (("verify", "-q"), ("verify", "1", "2", "--quiet"), ("tag", "t", "1", "-q"), ("tag", "-q", "u", "2")):
        res = gp("-A", arc, *args)
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", (args, res.stderr)
    assert gp("-A", arc, "tag", "-q").stdout == "t\t1\nu\t2\n"  # requested data still prints
    assert gp("-A", arc, "tier", "list", "-q", "--json").returncode == 0
    assert "ok: 2 versions" in gp("-A", arc, "verify").stdout  # not quiet unless asked


def test_diff_names_a_changed_dtype_and_measures_no_change_it_did_not(tmp_path: Path) -> None:
    """A tensor of the same shape in another dtype (fp32 -> fp16) showed as '[64, 32] -> [64, 32]', no dtype,
    and with nothing comparable the summary said 'overall relative L2 change 0': nothing changed. Now the dtypes
    are shown, the tensors not compared are counted, and no L2 change is claimed where none was measured."""
    w = tensors(0)
    with gpupas.create_repository(tmp_path / "arc") as repo:
        repo.commit("a", w)
        repo.commit("b", {"fc.weight": w["fc.weight"].astype(np.float16), "fc.bias": np.zeros(32, np.float32)})
    res = gp("-A", tmp_path / "arc", "diff", "1", "2")
    assert res.returncode == 0, res.stderr
    assert "float32 64x32 -> float16 64x32" in res.stdout and "float32 64 -> float32 32" in res.stdout
    assert "2 of another shape or dtype (not compared), overall relative L2 change -;" in res.stdout
