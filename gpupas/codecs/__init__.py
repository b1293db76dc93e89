"""Chunk codecs: registered by the id stored on disk, batched, pure (no I/O), one per module.

:mod:`~gpupas.codecs.registry` resolves an id to the implementation for a backend;
:mod:`~gpupas.codecs.policy` picks a codec per chunk. Every stored chunk ends with its CRC-32C.
"""
