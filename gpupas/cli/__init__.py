"""The ``gpupas`` command line: commands in :mod:`~gpupas.cli.app`, views in :mod:`~gpupas.cli.render`."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``gpupas`` script."""
    from gpupas.cli.app import run

    run()
