"""``python -m gpupas``: the command line."""

from gpupas.cli import main

main()
