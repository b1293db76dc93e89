"""A training-loop hook: one call per checkpoint, each snapshot a delta against the previous one.

>>> import numpy as np, tempfile
>>> hook = CheckpointHook(tempfile.mkdtemp() + "/arc", "mlp", hyperparameters={"lr": 0.1})
>>> w = np.zeros(4, np.float32)
>>> for step in (10, 20):
...     w += 0.5
...     v = hook({"w": w}, step=step, metrics={"loss": 1.0 / step})
>>> (v.id, len(v.snapshots), v.metrics["loss"])
(1, 2, [[10, 0.1], [20, 0.05]])
>>> _ = hook.close()

With PyTorch::

    hook = CheckpointHook("runs/archive", "resnet-ft", model=model, hyperparameters=cfg)
    for step, batch in enumerate(loader):
        ...
        if step % 500 == 0:
            hook(model, step=step, metrics={"loss": loss.item(), "lr": sched.get_last_lr()[0]})
    hook.close()

The first call publishes the version (network read off ``model`` with torch.fx, or off the
state_dict) and every later call appends a snapshot to it; with ``resume=`` the version exists
already, and every call, the first included, appends. The archive keeps the last committed
tensors in memory as the next delta base (torch tensors are copied on the way in; a NumPy array the
caller changed in place since fails its CRC check and is read back from the archive). With
``asynchronous=True`` a call that publishes the version still commits before it returns; each call
that appends (after the first, or every one with ``resume=``) copies the weights (on their device),
returns the version as last published, and commits the copy in the background, one at a time (see
:mod:`gpupas.integrations.async_commit`); a crash loses at most the snapshot in flight. A background commit's
error is raised by the next call (which then takes no checkpoint of its own) or by close(), with a note naming
the checkpoint's step.
Metric points given between checkpoints (:meth:`CheckpointHook.log`) are written with the next one.

Under ``torch.distributed`` (DDP, FSDP, torchrun) every process runs the hook and global rank 0 alone writes:
one version, as Lightning and the Hugging Face Trainer write checkpoints. On the other ranks a call takes the
module's ``state_dict()`` (a collective under FSDP's full state dict: rank 0's call would wait for theirs) and
returns None; ``log`` keeps nothing, ``close`` returns None, and the archive is not opened.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from gpupas.errors import ArchiveExistsError, ArchiveNotFoundError, InvalidInputError
from gpupas.versions.metrics import best_rule, merge_metrics, normalize_metrics, snapshot_step
from gpupas.versions.model import Version
from gpupas.versions.repository import Repository, as_refs, create_repository, open_repository


def _global_rank() -> int:
    """This process's global rank where torch.distributed is initialized, else 0 (torch is not imported for it; a
    module another thread is still importing has no group initialized yet)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or getattr(dist, "is_initialized", None) is None or not dist.is_available() \
            or not dist.is_initialized():
        return 0
    return int(dist.get_rank())


def _state_dict(obj: Any) -> Mapping[str, Any]:
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise InvalidInputError(f"a checkpoint is a torch module or a mapping of tensors, not a {type(obj).__name__}")


class CheckpointHook:
    """Commit checkpoints of one training run as the snapshots of one version.

    Parameters
    ----------
    archive
        A :class:`~gpupas.versions.repository.Repository` or the location of an archive (created if missing).
    name
        The version's name. ``parents`` (ids, tags or names; one may be given alone) give its lineage; the first
        snapshot is a delta against the first parent's latest one (fine-tuning), or against its
        ``from_snapshot`` (1-based index, id, "best") where a run resumes from an earlier one.
    best_by
        Keep the version's best snapshot the one its metric says ("accuracy": highest; "loss:min":
        lowest), chosen again after every checkpoint and at close: a checkpoint's value is the last
        point logged at or before its step, so an evaluation logged after it (at its step) counts
        for it. With ``best_by`` the metric decides, not a call's ``best=True``.
    resume
        An existing version of ``name`` (id, tag or name) to go on appending to, for a run restarted
        after a stop: its next snapshot is a delta on that version's latest (the version's parents,
        hyperparameters and files stay as they are).
    model
        The torch module, for the network definition; optional.
    hyperparameters, files, message, setting
        As :meth:`Repository.commit <gpupas.versions.repository.Repository.commit>`'s, for the version.
    asynchronous
        Commit each appended snapshot in a background thread, one at a time: a call copies the weights and
        returns the version as last published (the first call, which publishes it, still commits before it
        returns); a failed one is raised by the next call or close(); a crash loses at most the snapshot in flight.

    Where ``torch.distributed`` is initialized with several processes, only global rank 0 writes (see the
    module's note); ``repo`` and ``version`` are None on the others, and a call and :meth:`close` return None
    there. A hook made before the process group was initialized stands down on those ranks at its first use
    after (it releases the archive it opened). To archive every rank's own weights, call
    :meth:`Repository.add_snapshot <gpupas.versions.repository.Repository.add_snapshot>` on each.
    """

    def __init__(self, archive: Repository | str | os.PathLike[str], name: str, *, model: Any = None,
                 parents: Iterable[str | int] = (), hyperparameters: Mapping[str, Any] | None = None,
                 files: Any = None, message: str = "", setting: str = "default", asynchronous: bool = False,
                 from_snapshot: str | int | None = None, best_by: str | None = None,
                 resume: str | int | None = None):
        if best_by:
            best_rule(best_by)  # (checked before the archive is opened)
        self.best_by = best_by
        parents = as_refs(parents)  # (one parent may be given alone)
        self.name, self.model, self.parents = name, model, parents
        self.hyperparameters, self.files, self.message, self.setting = hyperparameters, files, message, setting
        self.from_snapshot = from_snapshot
        self.version: Version | None = None
        self._pending: dict[str, list[list[Any]]] = {}
        self._sent: dict[str, list[list[Any]]] = {}  # the metric points of the asynchronous commit in flight
        self._sent_step: int | None = None  # and its step
        self._async = None
        self._closed = False
        self._own = False
        self.repo: Repository | None = None
        self._writer = _global_rank() == 0  # (a rank other than 0 of torch.distributed writes nothing)
        if not self._writer:
            return
        if isinstance(archive, Repository):
            self.repo = archive
        else:
            try:
                self.repo = open_repository(archive)
            except ArchiveNotFoundError:
                try:
                    self.repo = create_repository(archive)
                except ArchiveExistsError:  # created meanwhile by another process (a rank before its group is up)
                    self.repo = open_repository(archive)
            self._own = True
        if resume is not None:
            try:
                self.version = self.repo.version(resume)
                if self.version.name != name:
                    raise InvalidInputError(f"resume={resume!r} is version {self.version.id} of "
                                            f"{self.version.name!r}, not of {name!r}")
            except BaseException:
                if self._own:
                    self.repo.close()
                raise
        if asynchronous:
            from gpupas.integrations.async_commit import AsyncCommitter

            self._async = AsyncCommitter(self._append)

    def log(self, step: int | None = None, **metrics: float) -> None:
        """Record metric values at ``step`` (written with the next checkpoint, or on close); a metric
        named "step" goes through a call's ``metrics=`` instead."""
        self._check_open("metric points")
        if self._writes():
            self._add(step, metrics)

    def _writes(self) -> bool:
        """Whether this process writes: not on a rank other than 0 of torch.distributed, where a hook made before
        the process group was initialized stands down (it releases its archive, keeping nothing)."""
        if self._writer and _global_rank() != 0:
            self._writer, self._pending = False, {}
            try:
                if self._async is not None:
                    self._async.close()
            finally:
                self._async, self.version = None, None
                if self._own and self.repo is not None:
                    self.repo.close()
                self.repo, self._own = None, False
        return self._writer

    def _check_open(self, what: str) -> None:
        """Refused after close(): nothing would write them (an asynchronous commit would be left in flight)."""
        if self._closed:
            raise InvalidInputError(f"the checkpoint hook of {self.name!r} is closed; {what} given to it would never "
                                    "be written: give them before close(), or to Repository.log_metrics / "
                                    "add_snapshot, or to a new CheckpointHook(..., resume=...)")

    def _add(self, step: int | None, metrics: Mapping[str, Any]) -> None:
        """Checked before kept: a bad value is refused here and leaves the points pending as they were."""
        if not isinstance(metrics, Mapping):
            raise InvalidInputError(f"metrics must map metric names to numbers, not be a {type(metrics).__name__}")
        at = 0 if step is None else step
        merge_metrics(self._pending, normalize_metrics({k: [[at, v]] for k, v in metrics.items()}))

    def _take(self, step: int | None, metrics: Mapping[str, Any] | None) -> dict[str, list[list[Any]]]:
        """The pending points with ``metrics`` at ``step`` added (nothing is changed where they are refused)."""
        before = {k: list(v) for k, v in self._pending.items()}
        if metrics:
            try:
                self._add(step, metrics)
            except BaseException:
                self._pending = before
                raise
        pending, self._pending = self._pending, {}
        return pending

    def __call__(self, model_or_state: Any, *, step: int | None = None, metrics: Mapping[str, Any] | None = None,
                 best: bool = False) -> Version | None:
        """Commit one checkpoint (a module or a state_dict); returns the version as it now stands (None on a rank
        of torch.distributed other than 0, which takes the module's state_dict and writes nothing)."""
        self._check_open("checkpoints")
        state = _state_dict(model_or_state)  # (on every rank: FSDP's full state_dict is a collective)
        if not self._writes():
            return None
        step = snapshot_step(step)
        series = self._take(step, metrics)
        try:
            return self._commit(model_or_state, state, step, series, best)
        except BaseException:  # nothing was committed (an asynchronous mode's submit raises before it copies)
            merge_metrics(self._pending, series)  # so its points stay pending, after a failed commit's in flight
            raise

    def _commit(self, model_or_state: Any, state: Mapping[str, Any], step: int | None,
                series: dict[str, list[list[Any]]], best: bool) -> Version:
        assert self.repo is not None
        if self.version is None:
            module = self.model if self.model is not None else (model_or_state if hasattr(model_or_state,
                                                                                          "named_modules") else None)
            by = self.best_by if self.best_by and best_rule(self.best_by)[0] in series else None  # (else: no best)
            self.version = self.repo.commit(
                self.name, state, parents=self.parents, message=self.message, hyperparameters=self.hyperparameters,
                metrics=series, files=self.files, network=module, setting=self.setting, step=step,
                best=1 if best and not by else None, best_by=by, from_snapshot=self.from_snapshot)
        elif self._async is not None:
            try:
                self._settle()
            except Exception as exc:
                exc.add_note(f"this call's checkpoint (step {step}) was not taken either: give it again")
                raise
            self._async.submit(state, step=step, metrics=series, best=best)
            self._sent, self._sent_step = series, step
        else:
            self.version = self._append(state, step=step, metrics=series, best=best)
        return self.version

    def _append(self, state: Mapping[str, Any], **kw: Any) -> Version:
        assert self.version is not None and self.repo is not None
        # the best picked in the same record update: a second one (mark_best) rewrote and re-indexed the whole
        # record again, every checkpoint (the asynchronous mode's thread, one commit at a time)
        self.version = self.repo.add_snapshot(self.version.id, state, setting=self.setting, best_by=self.best_by,
                                              **kw)
        return self.version

    def _settle(self) -> None:
        """Wait for the asynchronous commit in flight; where it failed, its metric points go back to pending (ahead
        of later ones), as a failed synchronous commit's stay, and its error is raised."""
        sent, self._sent = self._sent, {}
        try:
            if self._async is not None:
                self._async.wait()
        except BaseException as exc:
            merge_metrics(sent, self._pending)
            self._pending = sent
            if isinstance(exc, Exception) and self.version is not None:  # (an interrupted wait: nothing failed)
                exc.add_note(f"the checkpoint of step {self._sent_step}, committed in the background, failed: it is "
                             f"not in version {self.version.id} {self.version.name!r} (its metric points are kept)")
            raise

    def close(self) -> Version | None:
        """Finish the commit in flight, write metric points still pending and release the archive;
        returns the version (None on a rank of torch.distributed other than 0). A failed commit in flight is raised
        after the rest is done."""
        try:
            if not self._writes():
                return None
            assert self.repo is not None
            error = None
            if self._async is not None:
                try:
                    self._settle()
                except BaseException as exc:
                    error = exc
                self._async.close()
            if self._pending and self.version is not None:  # cleared once written: a close run again retries them
                self.version = self.repo.log_metrics(self.version.id, self._pending, best_by=self.best_by)
                self._pending = {}
            if error is not None:
                raise error
        finally:
            self._closed = True
            if self._own and self.repo is not None:
                self.repo.close()
        return self.version

    def __enter__(self) -> CheckpointHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
