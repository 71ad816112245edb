"""The `taylormlp` command: its parser (parser.py, torch-free until a command runs) and the commands."""

from .parser import build_parser, main  # noqa: F401 - the console script is taylormlp.cli:main
