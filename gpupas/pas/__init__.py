"""Parameter archival storage, the tensor side: bit layouts and byte planes, deltas (sub, xor, row
prediction, unchanged rows), context split, one tensor's planes <-> its bits (transform), lossy
schemes, guaranteed bounds from the top planes, and the named encoder settings.

The chunk codecs are in :mod:`gpupas.codecs`, the Zarr layout on disk in :mod:`gpupas.format`."""
