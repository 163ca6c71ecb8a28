"""``python -m duallora`` runs the command line."""

from duallora.cli import main

main()
