"""Running a built job on a scheduler chosen late.

``scheduler``: None or ``"local"`` -> a ``LocalCluster`` of ``workers`` worker processes (one thread
each) for this run; ``"sync"`` -> inline on this thread (small archives, tests, ``gpupas verify``); ``"threads"``
-> Dask's thread pool; an address (``tcp://host:8786``) -> ``Client(address)``; a
``distributed.Client`` -> that client.
"""

from __future__ import annotations

import logging
from typing import Any

from gpupas.errors import GpupasError, InvalidInputError

LOCAL = ("sync", "synchronous", "inline", "threads")
CLUSTER = "local"  # a local cluster of worker processes, as None (what `gpupas verify --scheduler local` names)


def check(scheduler: Any = None, workers: int = 2) -> None:
    """InvalidInputError for a scheduler or worker count :func:`run` could not use (before any work)."""
    if isinstance(scheduler, str) and scheduler not in (*LOCAL, CLUSTER) and ":" not in scheduler:
        raise InvalidInputError(f"scheduler {scheduler!r}: give 'local', 'sync', 'threads' or a Dask scheduler's "
                                "address (tcp://host:8786)")
    if scheduler in (None, CLUSTER) and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidInputError(f"workers={workers!r}: a local cluster needs at least one worker process")


def run(job: Any, scheduler: Any = None, *, workers: int = 2) -> list[Any]:
    """Compute ``job``'s targets; returns their results in order (raises the first task error)."""
    import dask

    check(scheduler, workers)
    if not job.targets:
        return []
    if scheduler == CLUSTER:
        scheduler = None
    if isinstance(scheduler, str) and scheduler in LOCAL:
        name = "sync" if scheduler != "threads" else "threads"
        return list(dask.compute(*job.targets, scheduler=name))
    from distributed import Client, LocalCluster

    _quiet_interrupts()
    if scheduler is not None and not isinstance(scheduler, str):
        return _gather(scheduler, job)
    if scheduler is None:
        # silence_logs: a task's failure reaches the caller as its exception; the workers' and nannies' own
        # log lines about it (tracebacks included) would only repeat it on stderr
        # no dashboard; its HTTP server (metrics) on a free port: on distributed's default, 8787, a second job (or
        # any other cluster) running warned "Port 8787 is already in use. Perhaps you already have a cluster
        # running?" and of an unclosed socket
        try:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.CRITICAL)
        except Exception as exc:  # distributed's "Nanny failed to start." (the cause is chained below it)
            raise _not_started(exc, workers) from None
        try:
            with Client(cluster) as client:
                return _gather(client, job)
        finally:
            try:
                cluster.close()
            except Exception as exc:  # a nanny restarting a dead worker as it closes (distributed's race)
                logging.getLogger("gpupas").debug("closing the local cluster: %r", exc)  # the job's outcome stands
    with _connect(scheduler) as client:
        return _gather(client, job)


def _not_started(exc: BaseException, workers: int) -> GpupasError:
    """The error for a local cluster that could not start: distributed's own ("Nanny failed to start.", "Cluster
    failed to start: ...") reached the command line as an unexpected RuntimeError; its first cause names why (a
    worker's import or preload that fails, a temporary directory that cannot be written)."""
    causes = [exc]
    while (nxt := causes[-1].__cause__ or causes[-1].__context__) is not None and nxt not in causes:
        causes.append(nxt)
    why = f"{type(causes[-1]).__name__}: {causes[-1]}"
    return GpupasError(f"the local Dask cluster of {workers} worker process(es) did not start ({why[:300]}); fix "
                       "what that names (Dask's settings: DASK_* variables, ~/.config/dask; its temporary-directory), "
                       "or run on a running cluster (--scheduler ADDRESS) or inline (--scheduler sync). Nothing was "
                       "changed")


class _AllExitFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for distributed's ``AllExit``: a gather interrupted
    (Ctrl-C) leaves one waiting task per result, each of which then raises it unseen, and asyncio printed a
    traceback for each after gpupas's own one line ("interrupted")."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        return not (exc is not None and exc.__name__ == "AllExit" and exc.__module__.startswith("distributed"))


class _LostSchedulerFilter(logging.Filter):
    """Drops distributed's client-side tracebacks of ``asyncio.CancelledError`` (its reconnection given up, its
    close cancelled) after the scheduler went away mid-job: the job's own error says so in one line (see
    :func:`_gather`), and they only repeated it on stderr, after it."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        exc = record.exc_info[0] if record.exc_info else None
        return not (exc is not None and issubclass(exc, asyncio.CancelledError))


def _quiet_interrupts() -> None:
    for name, kind in (("asyncio", _AllExitFilter), ("distributed.client", _LostSchedulerFilter)):
        log = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in log.filters):
            log.addFilter(kind())


CONNECT_S = 30.0  # how long a scheduler address may take to answer


def _listening(address: str) -> None:
    """GpupasError at once where nothing listens at a TCP ``address`` (a refused connection), which distributed
    retries for its whole timeout, or no connection is made within it (not waited for twice); other addresses
    and other failures are left to it."""
    import socket
    from urllib.parse import urlsplit

    if "://" not in address:
        address = f"tcp://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls"):
        return
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return
    if not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=CONNECT_S).close()
    except (ConnectionRefusedError, TimeoutError) as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else f"no answer in {CONNECT_S:g} s"
        raise GpupasError(f"no Dask scheduler answers at {address} (nothing listens there: {why}); start one "
                          "there (dask scheduler), or give --scheduler local for a cluster of worker processes "
                          "here. Nothing was changed") from None
    except OSError:
        return  # a name that does not resolve: distributed's own error says it


def _connect(address: str) -> Any:
    """``Client(address)``, or GpupasError naming the address: distributed's own Client waits forever on a
    service there that is not a Dask scheduler and never answers its handshake (an HTTP server), and fails with
    whatever reading another's answer as a message raises (MemoryError: a frame of exabytes)."""
    import threading

    from distributed import Client

    _listening(address)
    box: dict[str, Any] = {}
    seconds = CONNECT_S

    def connect() -> None:
        try:
            box["client"] = Client(address, timeout=seconds)
        except BaseException as exc:  # reported below, whatever it is
            box["error"] = exc

    t = threading.Thread(target=connect, name=f"gpupas-connect-{address}", daemon=True)
    t.start()
    t.join(seconds + 1)
    if "client" in box:
        return box["client"]
    why = "no answer" if "error" not in box else f"{type(box['error']).__name__}: {box['error']}"
    raise GpupasError(f"no Dask scheduler answers at {address} ({why[:200]}); start one there (dask scheduler), "
                      "or give --scheduler local for a cluster of worker processes here. Nothing was changed")


def _gather(client: Any, job: Any) -> list[Any]:
    from concurrent.futures import CancelledError

    from distributed import KilledWorker

    try:
        return list(client.gather(client.compute(job.targets)))
    except CancelledError as exc:  # distributed's FutureCancelledError: "unexpected" on the command line
        why = getattr(exc, "reason", None) or "unknown"
        raise GpupasError(f"the Dask job was cancelled before it finished ({why}): its scheduler stopped, or the "
                          "client was closed or lost its connection; run the job again on a running scheduler "
                          "(or --scheduler local). What it finished stands (snapshots a compaction revised keep "
                          "their new form; the others are as they were)") from None
    except KilledWorker as exc:  # its own message names a task key and a worker address, not what to do
        raise GpupasError(f"a Dask worker died running {exc.task!r} (most often out of memory: each worker holds a "
                          "snapshot's tensors and planes while it works); run the job again with fewer workers "
                          "(`compact --workers`) or more memory per worker. Snapshots it finished keep their new "
                          "form; the others are as they were") from None
