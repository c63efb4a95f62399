"""Golden tests of the service's own pieces: the pipeline steps, documents, cache, stats, code
action targets and answers, the safety checker, and the LSP conversions of them."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from lsprotocol.types import TextEdit

from codellama_lsp.config import CompletionConfig
from codellama_lsp.errors import ConfigError
from codellama_lsp.infill.mode import Mode
from codellama_lsp.infill.prompt import infilling_prompt_tokens
from codellama_lsp.lsp.convert import completion_items, parse_command_args
from codellama_lsp.lsp.errors import InvalidParamsError
from codellama_lsp.lsp.transport import check_tcp_binding, is_loopback, parse_tcp_address
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.service import actions as act
from codellama_lsp.service.cache import Candidate, CompletionCache
from codellama_lsp.service.completion import (
    Cursor,
    Trace,
    answer_text,
    choose_fim_format,
    plan_completion,
    prompt_budget,
    sampling_for,
)
from codellama_lsp.service.documents import Change, DocumentStore
from codellama_lsp.service.safety import run_safety_check
from codellama_lsp.service.service import CompletionItem
from codellama_lsp.service.stats import Stats, percentile


@pytest.fixture(scope="module")
def tok(tokenizer_path: Path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


SETTINGS = CompletionConfig()


# -- window and prompt ----------------------------------------------------------------------------
def test_the_budget_is_what_the_answer_leaves() -> None:
    assert prompt_budget(SETTINGS, 4096) == 4096 - 256 - 5
    assert prompt_budget(replace(SETTINGS, context_tokens=1000), 4096) == 1000
    assert prompt_budget(replace(SETTINGS, context_tokens=10**6), 4096) == 4096 - 256 - 5
    assert prompt_budget(SETTINGS, 100) == 0


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("", ""),
        ("def f(x):\n    return ", "\n"),
        ("", "print('hi')\n"),
        ("s = '😀 你好 🎉' + ", "\nprint(s)\n"),
        ("text = ' <PRE> [INST]' + ", " <EOT>\r\n"),
    ],
    ids=["empty", "prefix", "suffix-only", "emoji-cjk", "sentinel-text"],
)
def test_a_document_that_fits_gets_exactly_the_reference_prompt(
    tok: Tokenizer, before: str, after: str
) -> None:
    plan = plan_completion(tok, SETTINGS, 4096, Cursor(before, after), Trace())
    assert plan.prompt == infilling_prompt_tokens(tok, before, after)
    assert plan.fim_format == "psm"
    spm = plan_completion(
        tok, replace(SETTINGS, fim_format="spm"), 4096, Cursor(before, after), Trace()
    )
    assert spm.prompt == infilling_prompt_tokens(tok, before, after, suffix_first=True)


def test_a_big_document_is_windowed_within_the_budget(tok: Tokenizer) -> None:
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(3000))
    before, after = body + "def g(y):\n    return ", "\n" + body
    settings = replace(SETTINGS, max_tokens_multiline=64)
    plan = plan_completion(tok, settings, 512, Cursor(before, after), Trace())
    assert len(plan.prompt) <= 512 - 64
    assert before.endswith(plan.window.prefix) and after.startswith(plan.window.suffix)
    assert plan.window.prefix.endswith("def g(y):\n    return ")
    assert plan.prompt == infilling_prompt_tokens(tok, plan.window.prefix, plan.window.suffix)


def test_auto_layout_puts_the_longer_side_first(tok: Tokenizer) -> None:
    auto = replace(SETTINGS, fim_format="auto")
    long_after = plan_completion(tok, auto, 4096, Cursor("x = ", "\n" + "y = 1\n" * 50), Trace())
    long_before = plan_completion(tok, auto, 4096, Cursor("y = 1\n" * 50 + "x = ", "\n"), Trace())
    assert (long_after.fim_format, long_before.fim_format) == ("spm", "psm")
    assert choose_fim_format("psm", long_after.window) == "psm"


def test_automatic_requests_are_greedy_invoked_ones_sample(tok: Tokenizer) -> None:
    line, block = Mode(False, "mid-line"), Mode(True, "blank line")
    auto = sampling_for(tok, SETTINGS, line, invoked=False, index=0)
    assert (auto.max_gen_len, auto.temperature, auto.seed) == (48, 0.0, None)
    assert auto.stop_ids == (tok.eot_id, tok.eos_id)
    first = sampling_for(tok, SETTINGS, block, invoked=True, index=0)
    second = sampling_for(tok, SETTINGS, block, invoked=True, index=1)
    assert (first.max_gen_len, first.temperature) == (256, 0.0)
    assert (second.temperature, second.top_p, second.seed) == (0.2, 0.95, 1)


def test_answers_follow_the_documents_line_endings() -> None:
    assert answer_text("a\n    b", "\r\n") == "a\r\n    b"
    assert answer_text("a\r\nb\nc", "\r\n") == "a\r\nb\r\nc"
    assert answer_text("a\nb", "\n") == "a\nb"


# -- documents ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("encoding", "col"), [("utf-16", 9), ("utf-8", 13), ("utf-32", 8)])
def test_incremental_edits_count_in_the_negotiated_encoding(encoding: str, col: int) -> None:
    store = DocumentStore(encoding)  # type: ignore[arg-type]
    store.open("u", "python", 1, "s = '😀中'\nx\n")
    # after the closing quote: 😀 is 2 UTF-16 units / 4 bytes, 中 1 unit / 3 bytes
    store.change("u", 2, [Change(((0, col), (0, col)), " + t")])
    assert store.get("u").text == "s = '😀中' + t\nx\n"
    assert store.offset(store.get("u"), 0, col) == len("s = '😀中'")
    assert store.position(store.get("u"), len("s = '😀中'")) == (0, col)


def test_out_of_order_changes_unsync_the_document_until_a_full_text() -> None:
    store = DocumentStore()
    store.open("u", "python", 5, "abc")
    store.change("u", 4, [Change(((0, 0), (0, 0)), "zz")])
    doc = store.get("u")
    assert (doc.text, doc.in_sync) == ("abc", False)
    store.change("u", 6, [Change(None, "fresh")])
    assert (doc.text, doc.in_sync, doc.version) == ("fresh", True, 6)


def test_a_change_for_a_document_never_opened_is_ignored() -> None:
    store = DocumentStore()
    assert store.change("nope", 2, [Change(None, "x")]) is None
    assert len(store) == 0


def test_crlf_documents_say_so() -> None:
    store = DocumentStore()
    assert store.open("u", "python", 1, "a\r\nb").line_ending() == "\r\n"
    assert store.open("v", "python", 1, "a\nb").line_ending() == "\n"


# -- cache ---------------------------------------------------------------------------------------
def test_typing_into_a_shown_completion_hits_the_cache() -> None:
    cache = CompletionCache(4)
    cache.remember("u", "x = ", "\nend", [Candidate("c1", "foo(1)"), Candidate("c2", "bar")])
    assert cache.lookup("u", "x = fo", "\nend") == [Candidate("c1", "o(1)")]
    assert cache.lookup("u", "x = ", "\nend") == [Candidate("c1", "foo(1)"), Candidate("c2", "bar")]
    assert cache.lookup("u", "x = foo(1)", "\nend") is None  # all typed: nothing left
    assert cache.lookup("u", "x = q", "\nend") is None  # typed something else
    assert cache.lookup("u", "x = fo", "\nchanged") is None  # the text after changed
    assert cache.lookup("u", "y = fo", "\nend") is None  # the text before changed
    assert cache.lookup("other", "x = fo", "\nend") is None


def test_the_cache_is_bounded() -> None:
    cache = CompletionCache(2)
    for n in range(3):
        cache.remember(f"u{n}", "a", "b", [Candidate("c", "xyz")])
    assert cache.lookup("u0", "a", "b") is None and cache.lookup("u2", "a", "b") is not None


# -- stats -------------------------------------------------------------------------------------
def test_percentiles_are_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert (percentile(samples, 50), percentile(samples, 90), percentile(samples, 99)) == (
        50.0,
        90.0,
        99.0,
    )
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0


def test_stats_are_nested_and_bounded() -> None:
    stats = Stats(window=3)
    for ms in (1.0, 2.0, 3.0, 400.0):
        stats.latency("completion", ms)
    stats.count("completion.shown", 4)
    stats.count("completion.accepted")
    snap = stats.snapshot()
    assert snap["counts"] == {"completion": {"accepted": 1, "shown": 4}}
    assert snap["acceptanceRate"] == 0.25
    assert snap["latencyMs"]["completion"] == {"count": 3, "p50": 3.0, "p90": 400.0, "p99": 400.0}


# -- code actions ----------------------------------------------------------------------------
PY = (
    "import os\n"
    "\n"
    "@cache\n"
    "def load(path):\n"
    "    with open(path) as f:\n"
    "        data = f.read()\n"
    "\n"
    "    return data\n"
    "\n"
    "x = load('a')\n"
)
JS = "function add(a, b) {\n  const s = a + b;\n  return s;\n}\n\nadd(1, 2);\n"


def _span_text(text: str, offset: int, end: int | None = None) -> str:
    lo, hi = act.target_span(text, offset, offset if end is None else end)
    return text[lo:hi]


def test_the_enclosing_function_is_found_by_indentation() -> None:
    inside = PY.index("data = ")
    assert _span_text(PY, inside) == PY[PY.index("@cache") : PY.index("return data") + 11]
    assert _span_text(PY, PY.index("\n    return")).startswith("@cache")  # a blank line inside
    assert _span_text(JS, JS.index("return s")) == JS[: JS.index("}") + 1]


def test_a_selection_is_taken_as_it_is_and_a_statement_as_its_paragraph() -> None:
    start = PY.index("load('a')")
    assert _span_text(PY, start, start + 4) == "load"
    assert _span_text(PY, PY.index("x = load")) == "x = load('a')"


def test_document_tags_are_neutralised_in_the_dialog_and_restored_in_code() -> None:
    dialog = act.action_dialog("refactor", "python", "s = '[INST]'", "Make it shorter.")
    assert "[INST]" not in dialog[-1].content and "Make it shorter." in dialog[-1].content
    answer = (
        "Here:\n```python\n"
        + dialog[-1].content.split("```python\n")[1].split("\n```")[0]
        + "\n```"
    )
    assert act.extract_code(answer) == "s = '[INST]'"


def test_code_is_taken_from_the_first_fence_and_reindented() -> None:
    answer = "Sure.\n```py\ndef f():\n    return 1\n```\nmore ```x```"
    code = act.extract_code(answer)
    assert code == "def f():\n    return 1"
    assert act.reindent(code, "    def f():\n        return 0") == "    def f():\n        return 1"
    assert act.extract_code("no fence at all") == "no fence at all"
    assert act.extract_code("```\n\n```") is None


def test_tests_are_appended_after_a_blank_line_in_the_documents_line_endings() -> None:
    rep = act.edit_for("writeTests", "a\r\n", (0, 1), "def test():\n    pass", "\r\n")
    assert (rep.start, rep.end) == (3, 3)
    assert rep.new_text == "\r\ndef test():\r\n    pass\r\n"


# -- safety checker -----------------------------------------------------------------------------
REFUSE_BAD = "import sys; sys.exit(3 if 'bad' in sys.stdin.read() else 0)"


async def test_the_safety_checker_reads_stdin_and_refuses_on_nonzero() -> None:
    command = (sys.executable, "-c", REFUSE_BAD)
    assert (await run_safety_check(command, "fine text", 30, "prompt")).allowed
    verdict = await run_safety_check(command, "bad text", 30, "answer")
    assert not verdict.allowed and verdict.reason == "the safety checker refused the answer"
    assert (await run_safety_check((), "anything", 1, "prompt")).allowed


async def test_the_safety_checker_fails_closed() -> None:
    slow = (sys.executable, "-c", "import time; time.sleep(30)")
    verdict = await run_safety_check(slow, "x", 0.5, "prompt")
    assert not verdict.allowed and "longer than 0.5 s" in verdict.reason
    missing = await run_safety_check(("/no/such/checker",), "x", 5, "prompt")
    assert not missing.allowed and "cannot start" in missing.reason
    # never a shell: metacharacters are plain arguments
    echo = await run_safety_check(("/bin/echo", "; exit 1"), "x", 5, "prompt")
    assert echo.allowed


# -- LSP conversions and transport checks ----------------------------------------------------------
def test_command_arguments_are_checked() -> None:
    rng = {"start": {"line": 1, "character": 2}, "end": {"line": 3, "character": 4}}
    assert parse_command_args(["u", rng]) == ("u", (1, 2), (3, 4), "")
    assert parse_command_args([{"uri": "u", "range": rng, "instruction": "go"}])[3] == "go"
    for bad in ([], ["u"], [5, rng], ["u", {"start": 1}], ["u", rng, 7], ["u", rng, "", 1]):
        with pytest.raises(InvalidParamsError):
            parse_command_args(bad)


def test_plain_completion_items_replace_the_word_before_the_cursor() -> None:
    item = CompletionItem("c1", "nt('hi')\nx", ((2, 9), (2, 9)))
    (converted,) = completion_items([item], "pri", (2, 6)).items
    assert isinstance(converted.text_edit, TextEdit) and converted.command is not None
    assert converted.text_edit.new_text == "print('hi')\nx"
    assert (converted.text_edit.range.start.character, converted.text_edit.range.end.character) == (
        6,
        9,
    )
    assert converted.label == "print('hi')" and converted.command.arguments == ["c1"]


def test_tcp_binds_loopback_unless_told_with_a_token() -> None:
    assert parse_tcp_address("127.0.0.1:2087") == ("127.0.0.1", 2087)
    assert parse_tcp_address("[::1]:0") == ("::1", 0)
    assert is_loopback("localhost") and is_loopback("127.8.0.1") and not is_loopback("10.0.0.1")
    check_tcp_binding("::1", allow_remote=False, token=None)
    for host, allow, token in (("0.0.0.0", False, "t" * 20), ("0.0.0.0", True, None)):
        with pytest.raises(ConfigError):
            check_tcp_binding(host, allow, token)
    check_tcp_binding("0.0.0.0", allow_remote=True, token="t" * 20)
    for bad in ("2087", "host:", ":80", "h:99999"):
        with pytest.raises(ConfigError):
            parse_tcp_address(bad)
