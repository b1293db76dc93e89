"""What a commit accepts, normalized to a dict of the backend's arrays (checked, contiguous, native order):
NumPy on the CPU, CuPy (or the backend's DeviceTensor) on a GPU."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpupas.errors import InvalidInputError, UnsupportedDtypeError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
EXTRA_STATE = "_extra_state"  # torch: the key suffix of a module's get_extra_state() value
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json
# keys under which training code keeps a model's weights inside a larger checkpoint dict
WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params",
            "ema_state_dict", "model_ema")


def is_model_folder(path: Path) -> bool:
    """A folder that holds one model's weights: an index of shards, or a model weights file (Hugging Face)."""
    return path.is_dir() and (any(path.glob(f"*{INDEX_SUFFIX}")) or any((path / f).is_file() for f in WEIGHT_FILES))


def load_checkpoint(path: str | os.PathLike[str], notes: list[str] | None = None,
                    metadata: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a checkpoint, read without executing code: a safetensors file, a torch file (a state_dict,
    or a training checkpoint that wraps one: ``{"model": ..., "optimizer": ...}``, Lightning's
    ``{"state_dict": ...}``), or a model folder (sharded safetensors or torch files with their index,
    as Hugging Face writes them; or that index itself, ``model.safetensors.index.json``). What is left out
    (optimizer state, counters) is said in ``notes``; a safetensors file's own metadata (its header's
    ``__metadata__``) is put in ``metadata``."""
    if not isinstance(path, str | os.PathLike):  # (Path() raised a bare TypeError)
        hint = ("; a mapping of tensors needs no loading: commit it as it is" if isinstance(path, Mapping)
                else "")
        raise InvalidInputError(f"load_checkpoint takes the path of a checkpoint file or model folder, not a "
                                f"{type(path).__name__}{hint}")
    p = Path(path)
    if p.is_dir():
        if not is_model_folder(p):
            raise InvalidInputError(f"{p} is a folder without model weights (no *{INDEX_SUFFIX}, "
                                    f"{', '.join(WEIGHT_FILES[:2])})")
        return _load_folder(p, notes, metadata)
    if not p.is_file():
        raise InvalidInputError(f"checkpoint file {p} does not exist")
    if p.name.endswith(INDEX_SUFFIX):
        return _load_index(p, notes, metadata)
    if p.suffix == ".safetensors":
        from gpupas.integrations.safetensors import load_file

        try:
            return load_file(p, metadata)
        except InvalidInputError:
            kind = _what_file(p)
            if kind is None or kind == "a safetensors file":
                raise
            raise InvalidInputError(f"{p} is {kind}, not a safetensors file{_REMEDY.get(kind, '')}") from None
    if p.suffix in TORCH_SUFFIXES:
        from gpupas.integrations.torch import _torch

        torch = _torch()
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged or unsafe files
            kind = _what_file(p)
            if kind is not None and kind not in _TORCH_KINDS:
                raise InvalidInputError(f"{p} is {kind}, not a torch checkpoint{_REMEDY.get(kind, '')}") from None
            raise InvalidInputError(f"{p} is not a loadable torch checkpoint (weights only; no code is run): "
                                    f"{_why(exc, p)}") from None
        return as_tensor_dict(_unwrap(obj, str(p), notes), source=str(p))
    raise InvalidInputError(unknown_type(p, "a shard index (*.index.json) or a model folder"))


def unknown_type(p: Path, other: str) -> str:
    """The error for a file whose name is no checkpoint's: what it plainly is and what to do, where that is known
    (an .npz of arrays, a torch file under another suffix)."""
    kind = _what_file(p)
    said = f": it is {kind}{_REMEDY[kind]}. Give" if kind in _REMEDY else "; give"
    return (f"{p}: unknown checkpoint type {p.suffix!r}{said} a .safetensors file, a torch checkpoint "
            f"({', '.join(TORCH_SUFFIXES)}), {other}")


_TORCH_KINDS = ("a torch checkpoint", "a pickle (a legacy torch checkpoint)")
_REMEDY = {"a safetensors file": "; rename it to end in .safetensors",
           "a torch checkpoint": "; rename it to end in .pt",
           "a pickle (a legacy torch checkpoint)": "; rename it to end in .pt",
           "a gzip-compressed file": "; decompress it first (gunzip) and commit the checkpoint it holds",
           "a NumPy .npz archive": "; load it with numpy.load and commit its arrays as a mapping, or write them to "
                                   "a safetensors file (safetensors.numpy.save_file) and commit that",
           "a NumPy .npy array": "; load it with numpy.load and commit it as a mapping {name: array}, or write it "
                                 "to a safetensors file (safetensors.numpy.save_file) and commit that"}


def _what_file(path: Path) -> str | None:
    """What a file plainly is by its first bytes (a safetensors file, a torch zip checkpoint, a pickle, an .npz or
    .npy, gzip, a text file), for an error that says so; None where that is not plain."""
    import zipfile

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
        if len(head) >= 10 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
            return "a safetensors file"
        if head[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                return "a torch checkpoint"
            return "a NumPy .npz archive" if names and all(n.endswith(".npy") for n in names) else "a zip archive"
    except (OSError, zipfile.BadZipFile):
        return None
    if head[:2] == b"\x1f\x8b":
        return "a gzip-compressed file"
    if head[:1] == b"\x80":
        return "a pickle (a legacy torch checkpoint)"
    if head[:6] == b"\x93NUMPY":
        return "a NumPy .npy array"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a text file"
    return None


def _why(exc: Exception, path: Path) -> str:
    """torch.load's error in one plain line: an empty file named, a pickled object (not tensors) told to save
    its state_dict instead, terminal colour codes and torch's multi-paragraph advice left out."""
    if path.stat().st_size == 0:
        return "the file is empty"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    if "Unsupported operand" in text:  # the weights-only unpickler met a byte that is no pickle opcode
        return ("its bytes are not a pickle as torch.save writes (a damaged file, or not a torch checkpoint?); save or "
                "download it again")
    if "Weights only load failed" in text or "Unsupported global" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"it pickles Python objects{what}, not just tensors; save model.state_dict() with torch.save, "
                "or a safetensors file")
    if _cut_zip(path):  # torch says "[Errno 22] Invalid argument", or "failed finding central directory"
        return ("it is cut short or damaged: a zip file (as torch.save writes) whose directory at its end cannot be "
                "read (an interrupted save, download or copy?); save or download it again")
    text = text.splitlines()[0] if text else type(exc).__name__
    return f"{text} (a damaged or cut-short file? save or download it again)"


def _cut_zip(path: Path) -> bool:
    """True for a file that starts as a zip file does but whose zip directory does not read (truncated)."""
    import zipfile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
        with zipfile.ZipFile(path):
            return False
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return True


def _is_tensor(v: Any) -> bool:
    from gpupas.integrations.torch import is_torch_tensor
    from gpupas.xp import namespace

    return is_torch_tensor(v) or isinstance(v, np.ndarray) or namespace(v) is not np


def _refuse_packed(tensors: Mapping[Any, Any], source: str) -> None:
    """UnsupportedDtypeError for an entry holding quantized tensors in a tuple or list: a torch.ao quantized
    module's packed weights (``_packed_params._packed_params``: the int8 weight and its bias), which would
    otherwise be left out as "not tensors", the snapshot keeping the module's scale and zero point alone."""
    from gpupas.integrations.torch import is_torch_tensor

    for k, v in tensors.items():
        kind = next((x.dtype for x in v if is_torch_tensor(x) and x.is_quantized), None) \
            if isinstance(v, (tuple, list)) else None
        if kind is not None:
            raise UnsupportedDtypeError(
                f"{source}: {k!r} holds a quantized module's packed weights ({kind}), which cannot be archived as "
                "they are; commit the float model's state_dict (before quantization, or dequantize() its weights), "
                "or each weight's int_repr() with its scale and zero point as tensors")


def _without_extra_state(tensors: Mapping[Any, Any], source: str, notes: list[str] | None) -> Mapping[Any, Any]:
    """``tensors`` without the non-tensor ``*_extra_state`` entries of modules' ``get_extra_state`` (said in
    ``notes``)."""
    extra = [k for k, v in tensors.items() if isinstance(k, str) and k.endswith(EXTRA_STATE) and not _is_tensor(v)]
    if not extra:
        return tensors
    if notes is not None:
        notes.append(f"{source}: left out {', '.join(extra[:4])}" + ("..." if len(extra) > 4 else "")
                     + " (a module's extra state, not a tensor)")
    drop = set(extra)
    return {k: v for k, v in tensors.items() if k not in drop}


def _unwrap(obj: Any, source: str, notes: list[str] | None) -> Mapping[str, Any]:
    """The state_dict inside a torch checkpoint object (see :func:`load_checkpoint`)."""
    if not isinstance(obj, Mapping):
        raise InvalidInputError(f"{source} holds a {type(obj).__name__}, not a state_dict or a dict that holds one; "
                                "save its tensors by name (torch.save({'weight': t}, path)), or model.state_dict()")
    obj = _without_extra_state(obj, source, notes)
    _refuse_packed(obj, source)
    for key in WRAPPERS:
        if isinstance(obj.get(key), Mapping):
            _refuse_packed(obj[key], source)
    if obj and all(_is_tensor(v) for v in obj.values()):
        return _strip_wrappers(obj, source, notes)
    for key in WRAPPERS:
        inner = obj.get(key)
        said: list[str] = []
        kept = _without_extra_state(inner, source, said) if isinstance(inner, Mapping) and inner else None
        if kept is not None and all(_is_tensor(v) for v in kept.values()):
            inner = kept
            if notes is not None:
                notes += said
            skipped = [k for k in obj if k != key]
            if skipped and notes is not None:
                notes.append(f"{source}: took the weights under {key!r}; left out {', '.join(map(str, skipped[:6]))}"
                             + ("..." if len(skipped) > 6 else "") + " (optimizer state and counters are not archived"
                             + _apart(obj, skipped, "; ") + ")")
            return _strip_wrappers(inner, source, notes)
    tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
    if not tensors:
        keys = f"its keys are {', '.join(map(str, list(obj)[:8]))}" if obj else "it is empty"
        raise InvalidInputError(f"{source} holds no tensors a model could be rebuilt from: {keys}; save "
                                f"model.state_dict() (or a dict with it under one of {', '.join(WRAPPERS[:4])})")
    if notes is not None and len(tensors) < len(obj):
        left = [k for k in obj if k not in tensors]
        apart = _apart(obj, left, "")
        notes.append(f"{source}: left out {len(left)} entries that are not tensors: {', '.join(map(str, left[:6]))}"
                     + ("..." if len(left) > 6 else "") + (f" ({apart})" if apart else ""))
    return _strip_wrappers(tensors, source, notes)


def _apart(obj: Mapping[Any, Any], left: list[Any], lead: str) -> str:
    """What a note says of the entries ``left`` out of ``obj`` that hold tensors of their own (an EMA copy of
    the weights, a second model): '' where none does."""
    nested = [str(k) for k in left if isinstance(obj[k], Mapping) and any(map(_is_tensor, obj[k].values()))]
    return f"{lead}{', '.join(nested[:4])} holds tensors of its own: commit it apart to keep them" if nested else ""


_WRAPPED = {"module.": "DistributedDataParallel's", "_orig_mod.": "torch.compile's"}  # prefix: whose


def _strip_wrappers(tensors: Mapping[str, Any], source: str, notes: list[str] | None) -> Mapping[str, Any]:
    """Names without the prefixes that wrappers of a model add to every one: ``module.`` (DistributedDataParallel,
    DataParallel) and ``_orig_mod.`` (torch.compile), nested in any order (said in ``notes``): a compiled or
    distributed run's checkpoints then name their tensors as the plain model's do, and are deltas on them."""
    taken: list[str] = []
    while names := [k for k in tensors if isinstance(k, str)]:
        prefix = next((p for p in _WRAPPED if all(k.startswith(p) for k in names)), None)
        if prefix is None:
            break
        taken.append(prefix)
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    if taken and notes is not None:
        notes.append(f"{source}: took the tensor names without their '{''.join(taken)}' prefix "
                     f"({', '.join(_WRAPPED[p] for p in taken)})")
    return tensors


def _load_folder(folder: Path, notes: list[str] | None, metadata: dict[str, str] | None) -> dict[str, np.ndarray]:
    """A model folder: its shards by its index (the union of every shard's tensors), or its weights file."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        return _load_index(indexes[0], notes, metadata)
    weights = next(folder / f for f in WEIGHT_FILES if (folder / f).is_file())
    return load_checkpoint(weights, notes, metadata)


def _load_index(index: Path, notes: list[str] | None, metadata: dict[str, str] | None) -> dict[str, np.ndarray]:
    """The tensors of the shards a shard index (``*.index.json``) names, from its folder."""
    import json

    folder = index.parent
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInputError(f"{index} is not a shard index (no weight_map): {exc}") from None
    out: dict[str, np.ndarray] = {}
    for name in shards:
        # judged by the name, not by where a link leads: Hugging Face's cache links each file to a blob elsewhere
        shard = folder / name
        if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] in ("..", ""):
            raise InvalidInputError(f"{index} names a shard outside its folder: {name!r}")
        if shard.name.endswith(INDEX_SUFFIX):
            raise InvalidInputError(f"{index} names another index as a shard: {name!r}")
        if not shard.is_file():
            raise InvalidInputError(f"{index} names shard {name!r}, which is not in {folder} (an unfinished "
                                    "download or copy?); fetch every shard the index names")
        part = load_checkpoint(shard, notes, metadata)
        clash = set(part) & set(out)
        if clash:
            raise InvalidInputError(f"{folder}: tensor {sorted(clash)[0]!r} is in more than one shard")
        out.update(part)
    missing = set(weight_map) - set(out)
    if missing:
        raise InvalidInputError(f"{folder}: the index names tensors no shard holds: {sorted(missing)[:5]}")
    return out


class Loaded(dict):  # type: ignore[type-arg]
    """Tensors made for one commit (read from a checkpoint file, an asynchronous commit's copies): no caller holds
    them, so the delta-base cache counts what it keeps of them as its own (``cache_bytes``), as it does for a
    commit given the file's path."""


def tensors_of(tensors: Mapping[Any, Any], source: str, notes: list[str] | None) -> Mapping[Any, Any]:
    """The tensors of an in-memory mapping, named as a file's are: a module's non-tensor ``_extra_state`` left out,
    a training checkpoint's state_dict taken out of it, a DDP or torch.compile state_dict's ``module.`` or
    ``_orig_mod.`` taken off (said in ``notes``)."""
    tensors = _without_extra_state(tensors, source, notes)
    _refuse_packed(tensors, source)
    if any(isinstance(v, Mapping) for v in tensors.values()):  # a training checkpoint in memory
        return _unwrap(tensors, source, notes)
    return _strip_wrappers(tensors, source, notes)


def as_tensor_dict(tensors: Any, source: str = "input", backend: Any = None,
                   metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Named tensors as arrays of ``backend`` (NumPy by default); accepts a mapping of NumPy/CuPy/torch
    arrays or a checkpoint file path (a safetensors file's own metadata goes into ``metadata``). A mapping
    that wraps a state_dict (``{"model": ..., "optimizer": ...}``) gives the state_dict, as a file does,
    with a warning; so does a module's non-tensor ``_extra_state``, which is left out, and the ``module.``
    (DistributedDataParallel) or ``_orig_mod.`` (torch.compile) prefix of every name, which is taken off."""
    if backend is None:
        from gpupas.backend import get_backend

        backend = get_backend("numpy")
    notes: list[str] = []
    if isinstance(tensors, (str, os.PathLike)):
        tensors = load_checkpoint(tensors, notes, metadata)
    elif not isinstance(tensors, Mapping):
        raise InvalidInputError(
            f"{source}: expected a mapping of name -> tensor or a checkpoint path, got {type(tensors).__name__}"
        )
    else:
        tensors = tensors_of(tensors, source, notes)
    for note in notes:  # what else it holds is not archived: said, as Repository.commit says it
        warnings.warn(note, stacklevel=3)
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or "\0" in name:
            raise InvalidInputError(f"{source}: tensor name {name!r} must be a non-empty string without NUL")
        if isinstance(value, np.ma.MaskedArray) and np.ma.getmask(value) is not np.ma.nomask and value.mask.any():
            raise InvalidInputError(f"{source}: tensor {name!r} is a masked array, whose masked values would come "
                                    "back unmasked; commit value.filled(...) or value.data and the mask as a "
                                    "bool tensor")
        try:
            out[name] = backend.as_array(value, name)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{source}: {exc}") from None
        except UnsupportedDtypeError as exc:
            msg = str(exc) if repr(name) in str(exc) else f"tensor {name!r}: {exc}"
            raise UnsupportedDtypeError(msg if source == "input" else f"{source}: {msg}") from None  # the file named
    return out
