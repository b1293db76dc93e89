"""The one pipeline, both directions: stateless functions of (store, manifest, backend, executor).

:mod:`~gpupas.engine.stage` plans each tensor, :mod:`~gpupas.engine.encode` writes a snapshot's
streams, :mod:`~gpupas.engine.decode` rebuilds tensors from them, :mod:`~gpupas.engine.chain`
walks delta chains decoding each link once, :mod:`~gpupas.engine.bases` keeps delta bases in
memory under a budget, and :mod:`~gpupas.engine.executor` is the only place threads start.
"""
