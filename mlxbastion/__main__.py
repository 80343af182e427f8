"""``python -m mlxbastion`` runs the command line."""

from .cli import main

main()
