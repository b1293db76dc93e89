"""Training-loop commits that do not stall training (the asynchronous mode of the checkpoint hook).

What a call costs the training loop: one device copy of the weights. :meth:`AsyncCommitter.submit`
copies every tensor on the training stream (``torch._foreach_copy_``: a few fused launches, ~1 ms per
GB on an H100), records an event and returns; the commit itself (planes and nvCOMP on the GPU,
compressed bytes to pinned host memory, store writes, the manifest) runs on a background thread,
on CUDA streams of its own.

Why a copy: the optimizer step overwrites the weights in place, so without one the call would have
to wait until the GPU had produced every compressed byte (at best ~30 ms per GB), and the commit
would fail its changed-tensor check if it did not. The copy also serves as the next commit's delta
base, on the device: the archive's base cache keeps (borrows) the committed arrays and checks them
by CRC-32 before use, and this class keeps the copy unchanged until the next commit has been
published, so no base is read back from disk. GPU memory: one model copy, two while a commit is in
flight. Host memory: the backend's two pinned staging buffers and the compressed bytes in flight,
not the model size.

At most one commit is in flight: a call waits for the previous commit first (its error is raised
there), so a training loop that checkpoints faster than the store takes the bytes is slowed rather
than filled up. A crash loses at most the snapshot in flight: a snapshot exists once its manifest is
published, atomically, and every earlier one is complete. A process that exits without :meth:`close`
finishes the commit in flight first.

>>> import numpy as np, tempfile, gpupas
>>> arc = gpupas.create_archive(tempfile.mkdtemp() + "/arc")
>>> committer = AsyncCommitter(arc.commit)
>>> _ = committer.submit({"w": np.zeros(4, np.float32)})
>>> committer.wait().tensors[0].name
'w'
>>> committer.close(); arc.close()
"""

from __future__ import annotations

import os
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import ExitStack
from typing import Any

import numpy as np

from gpupas.engine.executor import Executor
from gpupas.errors import InvalidInputError
from gpupas.tensors import Loaded, as_tensor_dict, tensors_of


def _is_cuda_torch(t: Any) -> bool:
    from gpupas.integrations.torch import is_torch_tensor

    return is_torch_tensor(t) and t.device.type == "cuda"


def _on_cupy_stream(v: Any) -> bool:
    """Whether ``v`` is a CuPy array, or the CuPy backend's bfloat16/float8 tensor (CuPy bits): its copy runs on
    CuPy's current stream. (Another library's device array copies on its own stream: its caller orders it.)"""
    if type(v).__module__.split(".")[0] == "cupy":
        return True
    from gpupas.backend.cupy import DeviceTensor

    return isinstance(v, DeviceTensor)


def _probe(v: Any) -> Any:
    """A stand-in for ``v`` that a commit refuses where it refuses ``v``, without its data: ``v`` itself where it has
    none to copy (a meta, sparse, quantized or nested torch tensor; a DTensor, whose slice could be a collective),
    an empty slice of a torch.Tensor subclass (read through its own ops: a wrapper's data is not plain; ``v`` where
    they fail), else an empty array of its dtype (no other value is checked: copy_state refuses what is not a
    tensor)."""
    from gpupas.integrations.torch import is_torch_tensor

    if is_torch_tensor(v):
        import torch

        if (v.device.type == "meta" or v.layout != torch.strided or v.is_quantized or v.is_nested
                or type(v).__name__ == "DTensor"):
            return v
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            try:
                return v.detach()[(slice(0, 0),) * v.dim()] if v.dim() else v.detach()
            except (RuntimeError, TypeError):  # its ops refuse even that: the commit's own read of it says why
                return v
        return torch.empty(0, dtype=v.dtype)
    return np.empty(0, v.dtype) if isinstance(v, (np.ndarray, np.generic)) else np.empty(0, np.float32)


def copy_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """A copy of every tensor of ``state`` (CUDA tensors on the device, fused) and the CUDA events that
    complete when the device copies have: torch's (one for each GPU the tensors are on) and CuPy's, each
    recorded on the caller's current stream (of that GPU) after its copies (none without device arrays). The
    tensors are those a synchronous commit takes (a module's ``_extra_state``, a training checkpoint's
    optimizer state left out, with a warning)."""
    notes: list[str] = []
    state = tensors_of(state, "input", notes)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    as_tensor_dict({k: _probe(v) for k, v in state.items()})  # what the commit would refuse, refused now
    names = [k for k, v in state.items() if _is_cuda_torch(v)]
    out: dict[str, Any] = {}
    events = []
    if names:
        import torch

        srcs = [state[k].detach() for k in names]
        dsts = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in srcs]
        with torch.no_grad():
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(dsts, srcs)
            else:  # pragma: no cover - torch < 2.1
                for d, s in zip(dsts, srcs):
                    d.copy_(s)
        # Each device's copies ran on that device's current stream, and Event.record() with no stream records on
        # the current device's only ("Uses torch.cuda.current_stream() if no stream is specified. The stream's
        # device must match the event's device"): one event per device of the state (a model on several GPUs).
        for device in dict.fromkeys(t.device for t in dsts):
            events.append(torch.cuda.current_stream(device).record_event())
        out.update(zip(names, dsts))
    on_device = False
    for k, v in state.items():
        if k in out:
            continue
        if hasattr(v, "detach"):
            out[k] = v.detach().clone()
        elif isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "__cuda_array_interface__"):  # NumPy, CuPy
            out[k] = v.copy()
            on_device |= _on_cupy_stream(v)
        else:  # refused now, as a synchronous commit would, not by the next call
            raise InvalidInputError(f"{k!r} is a {type(v).__name__}, not a tensor: a checkpoint holds torch tensors "
                                    "or NumPy/CuPy arrays")
    if on_device:  # CuPy copied on the caller's current stream, which the commit's thread does not wait on
        import cupy

        events.append(cupy.cuda.Event())
        events[-1].record()
    return Loaded({k: out[k] for k in state}), events  # the copies: cache_bytes counts what it keeps of them


class _SideStreams:
    """A torch CUDA stream of its own for the background thread, so that what the commit waits for
    (the backend synchronizes the caller's current stream before reading a tensor) is the commit's
    own work, never the training loop's queue."""

    def __enter__(self) -> _SideStreams:
        self._stack = ExitStack()
        try:
            import torch

            if torch.cuda.is_available():
                self._stack.enter_context(torch.cuda.stream(torch.cuda.Stream()))
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _finish_at_exit(ref: weakref.ref[AsyncCommitter]) -> None:
    """At interpreter exit, before concurrent.futures takes no more work (the commit's coding and writes need it):
    the commit in flight is finished, its error (no call is left to raise it) warned. Not in a forked child
    (a DataLoader's worker), which inherits the hook but not the thread running the commit: it would wait forever."""
    committer = ref()
    if committer is not None and committer._pid == os.getpid():
        try:
            committer.wait()
        except Exception as exc:
            warnings.warn(f"the asynchronous commit in flight at exit failed: {exc!r}", stacklevel=1)


def _clear_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames of ``exc``'s traceback and of the errors it was raised
    from (the lines stay for the report): an error kept until it is raised holds no tensors."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            traceback.clear_frames(e.__traceback__)
            todo += [e.__cause__, e.__context__]


class AsyncCommitter:
    """Run ``commit(state, *args, **kwargs)`` on a copy of ``state`` in the background.

    ``commit`` is e.g. ``archive.commit`` or ``lambda s, **kw: repo.add_snapshot(version, s, **kw)``.
    :attr:`blocking_seconds` records what each :meth:`submit` cost its caller.
    """

    def __init__(self, commit: Callable[..., Any]):
        self._commit = commit
        self._pid = os.getpid()  # the process whose thread runs the commits (not a forked child)
        self._executor = Executor(2)  # its single background thread runs the commits, one at a time
        self._future: Future[Any] | None = None
        self._base: dict[str, Any] | None = None  # the last committed copy: the next commit's delta base
        self.blocking_seconds: list[float] = []
        self.last: Any = None
        try:  # (threading's exit hooks run before concurrent.futures' own, which refuses new work from then on)
            threading._register_atexit(_finish_at_exit, weakref.ref(self))  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # an older Python; an interpreter already shutting down
            pass

    def submit(self, state: Mapping[str, Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Copy ``state`` and commit the copy in the background; returns the commit's future. Waits
        for the previous commit first (raising its error, if it failed)."""
        t0 = time.perf_counter()
        self.wait()
        snapshot, events = copy_state(state)
        self._future = self._executor.background(self._run, snapshot, events, args, kwargs)
        self.blocking_seconds.append(time.perf_counter() - t0)
        return self._future

    def _run(self, snapshot: dict[str, Any], events: list[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            for event in events:
                event.synchronize()  # the copies are complete (the training stream may have moved on)
            with _SideStreams():
                result = self._commit(snapshot, *args, **kwargs)
        except BaseException as exc:  # kept for the next call: its traceback's frames would keep the copy alive
            del snapshot
            _clear_frames(exc)
            raise
        self._base = snapshot  # kept unchanged until the next commit is published: the device-resident base
        self.last = result
        return result

    def wait(self) -> Any:
        """The result of the commit in flight (None if there is none), once it is published."""
        fut, self._future = self._future, None
        return None if fut is None else fut.result()

    def close(self) -> Any:
        """Wait for the commit in flight, then stop the thread and drop the base copy."""
        try:
            return self.wait()
        finally:
            self._executor.close()
            self._base = None

    def __enter__(self) -> AsyncCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
