"""``python -m mlxbastion`` runs the command line."""

from .cli import run

run()
