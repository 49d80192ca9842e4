"""The ``updetr`` command line: argparse and printing live here and nowhere below (one module per subcommand)."""

from .common import config_from_args
from .root import build_parser, main

__all__ = ["build_parser", "config_from_args", "main"]
