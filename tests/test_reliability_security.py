"""Security: no generated code is run, no file is written but the private Explain document, no
file is read for context, no connection leaves the machine.

Statically: an AST scan of the package. Behaviourally: the real server (and its rank processes)
run with a `sys.addaudithook` installed by a `sitecustomize` module on PYTHONPATH (the ranks
inherit the environment), logging the interpreter's own audit events (open, socket.connect,
socket.bind, subprocess.Popen, os.system, os.exec, os.posix_spawn, compile) while the server
serves completions and code actions on documents of a real workspace folder. Python-level events
only: torch's C++ gloo sockets are not audited (their address is the loopback rendezvous the
parent chooses, `worker.ranks.free_port`, with GLOO_SOCKET_IFNAME=lo).

Referenced, not repeated: TCP binds to loopback by default and refuses another address without
--allow-remote and a token, and a token is required (test_lsp_protocol.py::test_tcp_*); logs
hold no document text at info (test_lsp_protocol.py::test_shutdown_and_exit_leave_no_process_and_
no_document_text).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from lsp_harness import alive, child_pids
from lsprotocol import types as t
from test_lsp_support import Session, inline, open_doc, running_server, server_command

import codellama_lsp
from codellama_lsp.lsp.explanations import FOLDER_PREFIX

pytestmark = [pytest.mark.slow]

PACKAGE = Path(codellama_lsp.__file__).resolve().parent
# Where the package may start a process, and why.
PROCESS_ALLOWED = {
    "worker/ranks.py": "the rank launcher (python -m codellama_lsp.worker.rank)",
    "service/safety.py": "the user's configured safety checker (argv, never a shell)",
    "demo_lsp.py": "the demo's editor side: it starts a server; the server never imports it",
}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
OS_PROCESS = ("system", "popen", "exec", "spawn", "posix_spawn", "fork")


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def test_the_package_never_evaluates_code_or_starts_shells() -> None:
    problems: list[str] = []
    process_users: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=where)
        for call in _calls(tree):
            name = _dotted(call.func)
            line = f"{where}:{call.lineno}: {name}"
            if isinstance(call.func, ast.Name) and name in FORBIDDEN_CALLS:
                problems.append(f"{line} evaluates code")
            if name.startswith("os.") and name.split(".")[1].startswith(OS_PROCESS):
                problems.append(f"{line} starts a process through os")
            if name.endswith("create_subprocess_shell"):
                problems.append(f"{line} runs a shell")
            for kw in call.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    problems.append(f"{line} passes shell={ast.unparse(kw.value)}")
            if name.startswith("subprocess.") or name.endswith("create_subprocess_exec"):
                process_users.add(where)
            if name == "torch.load" and not any(
                kw.arg == "weights_only"
                and isinstance(kw.value, ast.Constant)
                and kw.value.value is True
                for kw in call.keywords
            ):
                problems.append(f"{line} unpickles arbitrary objects (weights_only=True missing)")
    assert problems == []
    assert process_users <= set(PROCESS_ALLOWED), process_users - set(PROCESS_ALLOWED)
    assert {"worker/ranks.py", "service/safety.py"} <= process_users  # the scan sees them
    server_side = [p for p in PACKAGE.rglob("*.py") if p.name != "demo_lsp.py"]
    assert not any(
        "demo_lsp" in p.read_text(encoding="utf-8")
        for p in server_side
        if p.parent.name in ("lsp", "service", "worker", "model", "infill")
    )


# -- the audit hook ------------------------------------------------------------------------------
SITECUSTOMIZE = r"""
import json, os, sys

_path = os.environ.get("CODELLAMA_AUDIT_LOG")
if _path:
    _fd = os.open(f"{_path}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _WANTED = {"open", "socket.connect", "socket.bind", "subprocess.Popen", "os.system",
               "os.exec", "os.posix_spawn", "os.spawn", "compile"}

    def _plain(value):
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, (str, int, float, type(None))):
            return value
        if isinstance(value, (tuple, list)):
            return [_plain(v) for v in value]
        if hasattr(value, "__fspath__"):
            return os.fspath(value)
        return repr(value)[:200]

    def _hook(event, args):
        if event not in _WANTED:
            return
        if event == "compile":
            source, filename = args[0], args[1]
            text = source if isinstance(source, str) else (
                source.decode("utf-8", "replace") if isinstance(source, bytes) else "")
            record = {"event": event, "filename": _plain(filename), "source": text[:4000]}
        elif event in ("socket.connect", "socket.bind"):
            record = {"event": event, "family": int(args[0].family), "address": _plain(args[1])}
        else:
            record = {"event": event, "args": _plain(list(args))}
        record["pid"] = os.getpid()
        os.write(_fd, (json.dumps(record) + "\n").encode())

    sys.addaudithook(_hook)
"""


def assert_private(path: Path) -> None:
    """A file only its owner (this user) can read, in a folder only they can enter."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.parent.stat().st_uid == os.getuid()


def read_audit(directory: Path) -> list[dict[str, Any]]:
    records = []
    for path in directory.glob("audit.log.*"):
        for line in path.read_text(encoding="utf-8").splitlines():
            records.append(json.loads(line))
    return records


def _opened(record: dict[str, Any]) -> tuple[str | None, bool]:
    """(path, writes?) of an open event; None for an open of a file descriptor."""
    path, mode, flags = (record["args"] + [None, None])[:3]
    if not isinstance(path, str):
        return None, False
    writes = bool(mode and any(c in str(mode) for c in "wax+"))
    if isinstance(flags, int):
        writes = writes or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
    return os.path.realpath(path), writes


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


@pytest.mark.asyncio
async def test_serving_reads_and_writes_nothing_but_its_own_and_connects_nowhere(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    hook_dir, audit_dir = tmp_path / "hook", tmp_path / "audit"
    hook_dir.mkdir()
    audit_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    workspace = tmp_path / "workspace"
    (workspace / "pkg").mkdir(parents=True)
    sources = {
        "pkg/app.py": "import os\n\ndef load(path):\n    return open(path).read()\n\nx = load(",
        "pkg/helpers.py": "def twice(v):\n    return v * 2\n",
        "secrets.env": "TOKEN=do-not-read\n",
    }
    for name, text in sources.items():
        (workspace / name).write_text(text)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the server's business\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
        "CODELLAMA_AUDIT_LOG": str(audit_dir / "audit.log"),
    }
    answers: list[str] = []
    command = server_command(tiny_checkpoint)
    async with running_server(command, env=env, root_uri=workspace.as_uri()) as session:
        app = (workspace / "pkg/app.py").as_uri()
        open_doc(session.client, app, sources["pkg/app.py"])
        for invoked in (False, True):
            result = await inline(session, app, 5, len("x = load("), invoked)
            answers += [item.insert_text for item in result.items]
        point = {"line": 3, "character": 4}
        for name in ("explain", "writeTests"):
            request = t.ExecuteCommandParams(
                command=f"codellama.{name}", arguments=[app, {"start": point, "end": point}]
            )
            done: Any = await session.client.workspace_execute_command_async(request)
            answers.append(done.get("markdown", ""))
        explain = session.client.shown_documents[-1].uri
        # The Explain document: private, outside the workspace (removed at exit: see below).
        explain_path = Path(explain.removeprefix("file://"))
        assert_private(explain_path)
        assert not _inside(str(explain_path.resolve()), [str(workspace.resolve())])
        edits: list[Any] = [e.edit.document_changes for e in session.edits.edits]
        answers += [changes[0].edits[0].new_text for changes in edits]
    records = read_audit(audit_dir)
    assert records, "the audit hook did not run"
    pids = {r["pid"] for r in records}
    assert len(pids) >= 2  # the server and its rank

    # Files: no document (or anything else of the workspace) and nothing outside is read; the
    # only file written is the Explain document (the audit logs were opened before the hook).
    allowed_reads = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        str(PACKAGE.parent),
        str(tiny_checkpoint.resolve()),
        str(explain_path.parent.resolve()),
        "/proc",
        "/sys",
        "/dev",
        "/etc",
        "/usr",
        "/lib",
        str(hook_dir.resolve()),
    ]
    reads: set[str] = set()
    writes: set[str] = set()
    tempdir = os.path.realpath(tempfile.gettempdir())
    for record in records:
        if record["event"] == "open":
            path, writing = _opened(record)
            if path is not None:
                (writes if writing else reads).add(path)
    forbidden = [p for p in reads | writes if _inside(p, [str(workspace.resolve())])]
    assert forbidden == []
    assert str(outside.resolve()) not in reads
    assert [p for p in reads if not _inside(p, allowed_reads)] == []
    # tempfile.gettempdir() proves the folder writable with a file it deletes at once.
    probes = {p for p in writes if os.path.dirname(p) == tempdir and not os.path.exists(p)}
    own = [str(explain_path.parent.resolve()), "/dev"]
    assert [p for p in writes - probes if not _inside(p, own)] == []
    assert str(explain_path.resolve()) in writes
    assert not explain_path.parent.exists()  # the server removed its folder when it ended

    # Network: only loopback (the ranks' rendezvous) or local sockets.
    assert any(r["event"] == "socket.bind" for r in records)  # the rendezvous port: seen
    for record in records:
        if record["event"] in ("socket.connect", "socket.bind"):
            address = record["address"]
            if isinstance(address, list):
                assert address[0] in ("127.0.0.1", "::1", "localhost"), record
            else:
                assert isinstance(address, str), record  # AF_UNIX path

    # Processes: only the rank launcher (no safety checker configured here); never a shell.
    started = [r for r in records if r["event"] != "open" and r["event"].startswith(("os.", "sub"))]
    assert started, "the rank was started: the hook must see it"
    for record in started:
        assert record["event"] == "subprocess.Popen", record
        executable, argv = record["args"][0], record["args"][1]
        assert argv[:3] == [sys.executable, "-m", "codellama_lsp.worker.rank"], record
        assert executable in (sys.executable, None, argv[0]), record

    # Generated text is never compiled (compile covers exec and eval of strings too).
    generated = [a.strip() for a in answers if a and len(a.strip()) >= 4]
    assert generated, "the model answered nothing to check"
    sources_compiled = [r["source"] for r in records if r["event"] == "compile"]
    assert not any(g in src for g in generated for src in sources_compiled)


# -- the Explain folder ends with the server -------------------------------------------------------
async def explain_document(session: Session, uri: str) -> Path:
    """Runs Explain on an open document; the Markdown file the server asked the editor to show."""
    point = {"line": 1, "character": 4}
    request = t.ExecuteCommandParams(
        command="codellama.explain", arguments=[uri, {"start": point, "end": point}]
    )
    done: Any = await asyncio.wait_for(session.client.workspace_execute_command_async(request), 60)
    shown = session.client.shown_documents[-1].uri
    assert done["document"] == shown
    path = Path(shown.removeprefix("file://"))
    assert path.read_text(encoding="utf-8") == done["markdown"] + "\n"
    return path


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ["shutdown and exit", "end of input", "SIGTERM"])
async def test_the_explain_folder_is_private_and_removed_when_the_server_ends(
    tiny_checkpoint: Path, ending: str
) -> None:
    """Two explanations share one private folder; after shutdown + exit, or when the editor
    closes the server's input without them, folder and files are gone and the server exited."""
    async with running_server(server_command(tiny_checkpoint)) as session:
        open_doc(session.client, "file:///w/area.py", "def area(w, h):\n    return w * h\n")
        first = await explain_document(session, "file:///w/area.py")
        second = await explain_document(session, "file:///w/area.py")
        assert first.parent == second.parent and first != second
        assert first.parent.name.startswith(FOLDER_PREFIX)
        for path in (first, second):
            assert_private(path)
        process: Any = session.client._server
        ranks = child_pids(process.pid)
        assert ranks, "the model's rank is running"
        if ending == "shutdown and exit":
            await asyncio.wait_for(session.client.shutdown_session(), 60)
        elif ending == "end of input":
            process.stdin.close()
        else:
            process.send_signal(signal.SIGTERM)
        session.shut_down = True
        # 1: the client never said exit; 143: ended by SIGTERM, after cleaning up.
        exit_code = {"shutdown and exit": 0, "end of input": 1, "SIGTERM": 143}[ending]
        assert await asyncio.wait_for(process.wait(), 60) == exit_code
        assert not first.parent.exists()
        assert not [pid for pid in ranks if alive(pid)]  # the ranks were stopped, not orphaned


def test_the_explain_folder_is_removed_at_interpreter_exit(tmp_path: Path) -> None:
    """Without shutdown, exit or end of input (say the server's loop failed), atexit removes it."""
    script = (
        "from codellama_lsp.lsp.explanations import ExplanationFolder\n"
        "folder = ExplanationFolder()\n"
        "print(folder.write('# why').parent, flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        timeout=60,
    )
    folder = Path(out.stdout.strip())
    assert folder.parent == tmp_path and folder.name.startswith(FOLDER_PREFIX)
    assert list(tmp_path.iterdir()) == []  # written, then removed as the interpreter ended
