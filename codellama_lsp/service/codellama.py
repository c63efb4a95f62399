"""The reference's three text APIs (completion, infilling, chat) over any token generator.

`facebookresearch/codellama`'s `Llama` class couples these with loading and process setup; here they
are plain functions of a tokenizer and a batch generator, so the CLI and tests run them on the same
worker group the language server uses. Results have the reference's dictionary shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from codellama_lsp.infill.chat import Message, chat_refusal, chat_stop_ids, dialog_prompt_tokens
from codellama_lsp.infill.prompt import completion_prompt_tokens, infilling_prompt_tokens
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.types import EngineRequest, Generation, SamplingParams

BatchGenerator = Callable[[Sequence[EngineRequest]], list[Generation]]


@dataclass(frozen=True)
class Sampling:
    """What the caller chose; max_gen_len None means "up to max_seq_len - 1", as the reference."""

    temperature: float
    top_p: float
    max_gen_len: int | None = None
    logprobs: bool = False
    seed: int | None = None


class CodeLlama:
    """text_completion, text_infilling and chat_completion with the reference's semantics."""

    def __init__(self, tokenizer: Tokenizer, generate: BatchGenerator, max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self._generate = generate
        self._max_seq_len = max_seq_len
        # The token ids of the last call, for callers that report them (the CLI's --json).
        self.last_prompt_tokens: list[list[int]] = []
        self.last_generations: list[Generation] = []

    def text_completion(
        self, prompts: Sequence[str], sampling: Sampling, echo: bool = False
    ) -> list[dict[str, Any]]:
        prompt_tokens = [completion_prompt_tokens(self.tokenizer, p) for p in prompts]
        stops = (self.tokenizer.eos_id,)
        results = self._run(prompt_tokens, sampling, stops, echo=echo)
        return [
            self._with_logprobs({"generation": self.tokenizer.decode(g.tokens)}, g, sampling)
            for g in results
        ]

    def text_infilling(
        self,
        prefixes: Sequence[str],
        suffixes: Sequence[str],
        sampling: Sampling,
        suffix_first: bool = False,
    ) -> list[dict[str, Any]]:
        prompt_tokens = [
            infilling_prompt_tokens(self.tokenizer, pre, suf, suffix_first=suffix_first)
            for pre, suf in zip(prefixes, suffixes, strict=True)
        ]
        results = self._run(prompt_tokens, sampling, self._infill_stops())
        out = []
        for prefix, suffix, gen in zip(prefixes, suffixes, results, strict=True):
            middle = self.tokenizer.decode_nospace(gen.tokens)
            item = {"generation": middle, "full_text": prefix + middle + suffix}
            out.append(self._with_logprobs(item, gen, sampling))
        return out

    def chat_completion(
        self, dialogs: Sequence[Sequence[Message]], sampling: Sampling
    ) -> list[dict[str, Any]]:
        prompt_tokens = [dialog_prompt_tokens(self.tokenizer, d) for d in dialogs]
        refusals = [chat_refusal(d) for d in dialogs]
        results = self._run(prompt_tokens, sampling, chat_stop_ids(self.tokenizer))
        out = []
        for refusal, gen in zip(refusals, results, strict=True):
            content = refusal if refusal is not None else self.tokenizer.decode(gen.tokens)
            message: dict[str, str] = {"role": "assistant", "content": content}
            if self.tokenizer.step_id is not None:
                message = {"role": "assistant", "destination": "user", "content": content}
            out.append(self._with_logprobs({"generation": message}, gen, sampling))
        return out

    # -- helpers --------------------------------------------------------------------------------
    def _infill_stops(self) -> tuple[int, ...]:
        # The reference stops infilling at <EOT>; EOS ends it as well (SPEC.md).
        eot = self.tokenizer.eot_id
        return (self.tokenizer.eos_id,) if eot is None else (eot, self.tokenizer.eos_id)

    def _run(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        stop_ids: tuple[int, ...],
        echo: bool = False,
    ) -> list[Generation]:
        requests = [
            EngineRequest(
                request_id=f"cli-{index}",
                prompt_tokens=tuple(tokens),
                params=SamplingParams(
                    max_gen_len=self._max_gen_len(sampling, len(tokens)),
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    stop_ids=stop_ids,
                    logprobs=sampling.logprobs,
                    echo=echo,
                    seed=sampling.seed,
                ),
            )
            for index, tokens in enumerate(prompts)
        ]
        results = self._generate(requests)
        self.last_prompt_tokens = [list(tokens) for tokens in prompts]
        self.last_generations = [
            Generation(r.request_id, list(r.tokens), r.logprobs, r.prompt_logprobs, r.finish_reason)
            for r in results
        ]
        if echo:
            for request, result in zip(requests, results, strict=True):
                result.tokens = [*request.prompt_tokens, *result.tokens]
        return results

    def _max_gen_len(self, sampling: Sampling, prompt_len: int) -> int:
        wanted = self._max_seq_len - 1 if sampling.max_gen_len is None else sampling.max_gen_len
        # Like the reference, generation never runs past max_seq_len.
        return max(0, min(wanted, self._max_seq_len - prompt_len))

    def _with_logprobs(
        self, item: dict[str, Any], gen: Generation, sampling: Sampling
    ) -> dict[str, Any]:
        if sampling.logprobs:
            item["tokens"] = [self.tokenizer.id_to_piece(t) for t in gen.tokens]
            item["logprobs"] = [*(gen.prompt_logprobs or []), *(gen.logprobs or [])]
        return item
