"""Archive-wide jobs on Dask: verification, compaction (re-basing per a plan), re-encoding, gc.

:mod:`~gpupas.jobs.graph` builds the task graphs (Dask delayed objects) without running them;
:mod:`~gpupas.jobs.run` runs them on a scheduler chosen late (none: a ``LocalCluster`` of worker
processes; an address: that scheduler; ``"sync"``: inline, for small archives);
:mod:`~gpupas.jobs.tasks` holds the pure, picklable task functions.
"""

from __future__ import annotations

from gpupas.jobs.graph import Job, compact_graph, gc_graph, reencode_graph, verify_graph
from gpupas.jobs.run import run
from gpupas.jobs.tasks import ArchiveSpec

__all__ = ["ArchiveSpec", "Job", "compact_graph", "gc_graph", "reencode_graph", "run", "verify_graph"]
