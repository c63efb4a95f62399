"""The CLI's `complete`, `infill` and `chat`: the reference's three example scripts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from codellama_lsp.config import Config
from codellama_lsp.errors import ConfigError, PromptError
from codellama_lsp.infill.chat import Message
from codellama_lsp.model.checkpoint import find_checkpoint, verify_checklist
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.types import EngineRequest, Generation
from codellama_lsp.service.codellama import CodeLlama, Sampling
from codellama_lsp.worker.group import run_requests
from codellama_lsp.worker.settings import settings_from


def run_command(command: str, args: argparse.Namespace, config: Config) -> dict[str, Any]:
    """Run one generation command; the result has the reference's keys plus `display`."""
    model = config.model
    if model.ckpt_dir is None:
        raise ConfigError("--ckpt-dir is required")
    find_checkpoint(model.ckpt_dir)  # a missing or incomplete folder is the first thing to say
    if args.verify:
        verify_checklist(model.ckpt_dir)
    tokenizer = Tokenizer(model.tokenizer_file or model.ckpt_dir / "tokenizer.model")
    settings = settings_from(model)

    def generate(requests: Sequence[EngineRequest]) -> list[Generation]:
        return run_requests(settings, list(requests))

    llama = CodeLlama(tokenizer, generate, max_seq_len=model.max_seq_len)
    sampling = _sampling(args)
    if command == "complete":
        return _complete(llama, args, sampling)
    if command == "infill":
        return _infill(llama, args, sampling)
    return _chat(llama, args, sampling)


def _sampling(args: argparse.Namespace) -> Sampling:
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.max_gen_len is not None and args.max_gen_len < 1:
        raise ConfigError("--max-gen-len must be at least 1")
    return Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        max_gen_len=args.max_gen_len,
        logprobs=args.logprobs,
        seed=args.seed,
    )


def _complete(llama: CodeLlama, args: argparse.Namespace, sampling: Sampling) -> dict[str, Any]:
    result = llama.text_completion([args.prompt], sampling, echo=args.echo)[0]
    prompt_ids = llama.last_prompt_tokens[0]
    text = result["generation"]
    shown = text if args.echo else args.prompt + text
    return _finish(result, prompt_ids, llama.last_generations[0], display=shown)


def _infill(llama: CodeLlama, args: argparse.Namespace, sampling: Sampling) -> dict[str, Any]:
    result = llama.text_infilling([args.prefix], [args.suffix], sampling, suffix_first=args.spm)[0]
    prompt_ids = llama.last_prompt_tokens[0]
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    display = f"{args.prefix}{bold}{result['generation']}{plain}{args.suffix}"
    return _finish(result, prompt_ids, llama.last_generations[0], display=display)


def _chat(llama: CodeLlama, args: argparse.Namespace, sampling: Sampling) -> dict[str, Any]:
    dialog = _dialog(args)
    result = llama.chat_completion([dialog], sampling)[0]
    prompt_ids = llama.last_prompt_tokens[0]
    display = result["generation"]["content"]
    return _finish(result, prompt_ids, llama.last_generations[0], display=display)


def _dialog(args: argparse.Namespace) -> list[Message]:
    turns: list[tuple[str, str]] = list(getattr(args, "messages", None) or [])
    if not turns:
        raise PromptError("chat needs at least one --user message")
    dialog: list[Message] = []
    if args.system is not None:
        dialog.append(Message(role="system", content=args.system))
    dialog.extend(Message.from_dict({"role": role, "content": text}) for role, text in turns)
    return dialog


def _finish(
    result: dict[str, Any], prompt_ids: list[int], generation: Generation, display: str
) -> dict[str, Any]:
    out = dict(result)
    out["prompt_tokens"] = prompt_ids
    out["generation_tokens"] = list(generation.tokens)
    out["finish_reason"] = generation.finish_reason
    out["display"] = display
    return out
