"""What is on disk, versioned: keys, the manifest, the stream layout, shard indexes, Zarr metadata.

No array math, no threads, no I/O: the store writes what this package describes, the engine fills
it. ``docs/FORMAT.md`` is the specification this code implements.
"""
