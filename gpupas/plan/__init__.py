"""Storage plans (ModelHub, ICDE 2017, sec. 5): which snapshots are stored whole, which as deltas on which base.

:mod:`~gpupas.plan.graph` (the storage graph, plans, budgets), :mod:`~gpupas.plan.planners`
(MST, SPT, LAST, PAS-MT, PAS-PT; :mod:`~gpupas.plan.arborescence` for the MST),
:mod:`~gpupas.plan.costs` (the recreation cost model and its calibration),
:mod:`~gpupas.plan.measure` (the storage graph of an archive, sizes measured or sampled),
:mod:`~gpupas.plan.archive` (``plan_archive``: every plan of an archive side by side),
:mod:`~gpupas.plan.realize` (a snapshot plan as revisions, parents first),
:mod:`~gpupas.plan.synthetic` (graphs shaped like the paper's). Nothing here is imported by
``import gpupas``; networkx is imported only where a planner needs it.
"""
