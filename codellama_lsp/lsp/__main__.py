"""`python -m codellama_lsp.lsp [flags]`: the server alone (the CLI's `serve` runs the same)."""

from __future__ import annotations

import argparse
import sys

from codellama_lsp.config import add_model_arguments, add_server_arguments
from codellama_lsp.lsp.serve import serve_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="codellama-lsp-server", description=__doc__)
    add_model_arguments(parser)
    add_server_arguments(parser)
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
