"""`codellama-lsp`: the command line.

`complete`, `infill` and `chat` mirror the reference's three example scripts and run on the same
worker group as the language server; `serve` starts the language server; `demo` shows it all on a
tiny random-weight checkpoint. Every error a user can cause ends in one clear line, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from codellama_lsp import __version__
from codellama_lsp.config import (
    Config,
    add_model_arguments,
    add_server_arguments,
    config_from_cli_args,
)
from codellama_lsp.errors import CodeLlamaError, ConfigError


class _AppendMessage(argparse.Action):
    """--user/--assistant keep their order on the command line: they form the dialog."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        messages = list(getattr(namespace, "messages", None) or [])
        messages.append((self.dest, str(values)))
        namespace.messages = messages


def _add_generation_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    add_model_arguments(parser)
    parser.add_argument("--max-gen-len", type=int, default=None, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--logprobs", action="store_true", help="report token logprobs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verify", action="store_true", help="check checklist.chk md5 sums")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codellama-lsp", description="Code Llama completions and code actions for editors."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    complete = sub.add_parser("complete", help="continue a prompt (text completion)")
    _add_generation_arguments(complete, temperature=0.6)
    complete.add_argument("--prompt", required=True, help="the text to continue")
    complete.add_argument("--echo", action="store_true", help="include the prompt in the answer")

    infill = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix")
    _add_generation_arguments(infill, temperature=0.0)
    infill.add_argument("--prefix", required=True, help="text before the cursor")
    infill.add_argument("--suffix", default="", help="text after the cursor")
    infill.add_argument("--spm", action="store_true", help="suffix-prefix-middle layout")

    chat = sub.add_parser("chat", help="ask an Instruct model")
    _add_generation_arguments(chat, temperature=0.6)
    chat.add_argument("--system", default=None, help="system message")
    for role in ("user", "assistant"):
        chat.add_argument(f"--{role}", dest=role, action=_AppendMessage, help=f"{role} message")

    serve = sub.add_parser("serve", help="run the language server (stdio by default)")
    add_model_arguments(serve)
    add_server_arguments(serve)
    serve.add_argument("--stdio", action="store_true", help="stdio transport (the default)")

    demo = sub.add_parser("demo", help="run everything on a tiny random-weight checkpoint")
    demo.add_argument("--cache-dir", default=None, help="where the demo checkpoint is written")
    demo.add_argument("--no-lsp", action="store_true", help="skip the language-server round trip")
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = config_from_cli_args(args)
    for problem in config.problems:
        print(f"codellama-lsp: warning: {problem}", file=sys.stderr)
    if config.model.ckpt_dir is None:
        raise ConfigError("--ckpt-dir is required: a folder with params.json and the weights")
    return config


def _run_generation(args: argparse.Namespace) -> int:
    from codellama_lsp.service.cli_commands import run_command

    result = run_command(args.command, args, _config(args))
    _print_result(args, result)
    return 0


def _print_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(result["display"])


def _serve(args: argparse.Namespace) -> int:
    from codellama_lsp.lsp.server import serve

    config = config_from_cli_args(args)
    return serve(config, args)


def _demo(args: argparse.Namespace) -> int:
    from codellama_lsp.demo import run_demo

    return run_demo(cache_dir=args.cache_dir, with_lsp=not args.no_lsp)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"serve": _serve, "demo": _demo}
    handler = handlers.get(args.command, _run_generation)
    try:
        return handler(args)
    except CodeLlamaError as exc:
        print(f"codellama-lsp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
