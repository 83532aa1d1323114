"""Run the CLI as ``python -m mailingest``."""

from mailingest.cli import entry

entry()
