"""Parameter archival storage: byte planes, deltas, context split, chunk codecs, Zarr layout."""
