"""Model versions (ModelHub's dlv layer): records, lineage, tags, files, metrics, export, inspection.

:mod:`~gpupas.versions.repository` is the workflow; :mod:`~gpupas.versions.records` reads and
writes records through the archive's store; :mod:`~gpupas.versions.model` defines a version;
:mod:`~gpupas.versions.metrics`, :mod:`~gpupas.versions.export`, :mod:`~gpupas.versions.inspect`
and :mod:`~gpupas.versions.verify` hold one concern each.
"""
