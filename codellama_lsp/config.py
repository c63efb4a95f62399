"""One typed, validated configuration, built from CLI flags and from editor settings.

Every setting is a field of one of four frozen sections (`model`, `completion`, `actions`,
`server`). The same validators run whether a value comes from the command line, from
`initializationOptions` or from `workspace/didChangeConfiguration`: an invalid value never raises,
it becomes a `ConfigProblem` (which key, what was wrong, which safe value is used instead) and the
field keeps its previous (or default) value.

Editor settings may be nested or flat, in snake_case or camelCase, optionally under a top-level
`codellama` key (what `workspace/configuration` and VS Code's `settings.json` produce):

    {"model": {"ckpt_dir": "/m/CodeLlama-7b"}, "completion": {"fimFormat": "spm"}}
    {"codellama": {"completion": {"max_tokens_single_line": 48}}}
    {"ckptDir": "/m/CodeLlama-7b", "temperature": 0.2}  # flat

Flat names that exist in two sections (`temperature`, `top_p`, `max_gen_len`...) mean the
completion setting; use the nested form for the other section. `SETTINGS_SCHEMA` lists every key.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

Device = Literal["cpu", "cuda", "auto"]
Dtype = Literal["bfloat16", "float16", "float32"]
FimFormat = Literal["psm", "spm", "auto"]
LogLevel = Literal["debug", "info", "warning", "error"]

# Model settings need a new worker group; they are read once, before the model loads.
RESTART_SECTIONS = ("model",)


# -- validators: raw value -> typed value, or ValueError with a message for a person ------------
Validator = Callable[[Any], Any]


def _int(lo: int, hi: int | None = None) -> Validator:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"expected an integer {bounds}, got {value}")
        return value

    return check


def _float(lo: float, hi: float) -> Validator:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if not isinstance(value, int | float) or value != value:  # NaN is not a setting
            raise ValueError(f"expected a number, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"expected a number between {lo} and {hi}, got {value}")
        return float(value)

    return check


def _choice(*options: str) -> Validator:
    def check(value: Any) -> str:
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(text)

    return check


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _optional_path(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    if isinstance(value, Path):
        return value.expanduser()
    if not isinstance(value, str) or "\x00" in value:
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value).expanduser()


def _command(value: Any) -> tuple[str, ...]:
    """A program and its arguments: a list of strings, or one string split like a shell would
    (the command is never run through a shell)."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise ValueError(f"cannot split command {value!r}: {exc}") from None
    if isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError(f"expected a command (a string or a list of strings), got {value!r}")


def _string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    raise ValueError(f"expected a list of strings, got {value!r}")


def _text(max_len: int) -> Validator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            raise ValueError(f"expected a string of at most {max_len} characters")
        return value

    return check


_DTYPES = ("bfloat16", "float16", "float32")
_LEVELS = ("debug", "info", "warning", "error")
_FIM_DOC = "prompt layout: psm, spm, or auto (spm when the suffix is the longer side)"
_CONTEXT_DOC = "prompt budget in tokens (0: maxSeqLen minus the answer's budget)"
_KV_TOKENS_DOC = "KV-cache pool in tokens, all requests (0: CUDA by fraction, CPU batch*seq)"
_KV_FRACTION_DOC = "CUDA: share of the memory free after the weights for the KV cache"
_FAST_DOC = "CUDA: fused projections, Triton kernels and graphs recorded at start"
_ACROSS_DOC = "with nproc > 1: CUDA graphs that hold the NCCL all-reduces too (false: eager steps)"
_PEER_DOC = "nproc > 1 on GPUs: decode's all-reduces through peer memory (experimental)"
_SPECULATE_DOC = "greedy requests alone: check drafts from the request's own n-grams"
_INSTRUCT_DOC = "Instruct checkpoint for code actions (= model.ckptDir: one worker group)"
_SHARE_DOC = "the completion model is a 7B/13B Instruct model: actions run on it too"
_SAFETY_DOC = "checker command: reads text on stdin, non-zero exit refuses (never a shell)"
_REFACTOR = "Refactor this code to be clearer and simpler without changing its behaviour."


# -- the sections ------------------------------------------------------------------------------
def _setting(default: Any, check: Validator, doc: str) -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


_S = _setting  # keeps the tables below one line a setting


@dataclass(frozen=True)
class ModelConfig:
    """The completion model and the worker group that runs it."""

    ckpt_dir: Path | None = _S(None, _optional_path, "Meta-layout checkpoint folder")  # noqa: RUF009
    tokenizer_path: Path | None = _S(None, _optional_path, "default: <ckptDir>/tokenizer.model")  # noqa: RUF009
    nproc: int = _S(1, _int(1, 64), "model-parallel ranks (one process each)")
    device: Device = _S("auto", _choice("cpu", "cuda", "auto"), "cpu, cuda or auto")  # noqa: RUF009
    dtype: Dtype = _S("bfloat16", _choice(*_DTYPES), "bfloat16, float16 or float32")  # noqa: RUF009
    max_seq_len: int = _S(4096, _int(64, 1 << 20), "KV-cache tokens per sequence")
    max_batch_size: int = _S(4, _int(1, 1024), "concurrent sequences")
    kv_cache_tokens: int = _S(0, _int(0, 1 << 30), _KV_TOKENS_DOC)
    kv_cache_fraction: float = _S(0.9, _float(0.01, 1), _KV_FRACTION_DOC)
    fast_kernels: bool = _S(True, _bool, _FAST_DOC)
    graphs_across_ranks: bool = _S(True, _bool, _ACROSS_DOC)
    peer_all_reduce: bool = _S(False, _bool, _PEER_DOC)
    speculative_decoding: bool = _S(False, _bool, _SPECULATE_DOC)
    load_timeout_s: float = _S(900.0, _float(1, 86400), "seconds to load the model")
    request_timeout_s: float = _S(120.0, _float(1, 3600), "seconds a request may stall")
    # The worker group's fault timings (worker.settings.WorkerSettings has the same fields).
    init_timeout_s: float = _S(120.0, _float(1, 3600), "seconds for the ranks' rendezvous")
    heartbeat_interval_s: float = _S(0.5, _float(0.01, 60), "seconds between rank heartbeats")
    hang_timeout_s: float = _S(30.0, _float(0.1, 3600), "no heartbeat this long: a rank hangs")
    max_restarts: int = _S(3, _int(0, 100), "consecutive faults before giving up")
    restart_backoff_s: float = _S(1.0, _float(0, 600), "first restart delay (then doubled)")

    @property
    def tokenizer_file(self) -> Path | None:
        if self.tokenizer_path is not None:
            return self.tokenizer_path
        return None if self.ckpt_dir is None else self.ckpt_dir / "tokenizer.model"


@dataclass(frozen=True)
class CompletionConfig:
    """Inline (fill-in-the-middle) completion."""

    enabled: bool = _S(True, _bool, "answer completion requests")
    fim_format: FimFormat = _S("psm", _choice("psm", "spm", "auto"), _FIM_DOC)  # noqa: RUF009
    max_tokens_single_line: int = _S(48, _int(1, 4096), "tokens of a line answer")
    max_tokens_multiline: int = _S(256, _int(1, 8192), "tokens of a block answer")
    temperature: float = _S(0.2, _float(0, 2), "sampling of invoked requests")
    top_p: float = _S(0.95, _float(0, 1), "nucleus sampling of invoked requests")
    num_candidates: int = _S(3, _int(1, 8), "candidates of an invoked request")
    context_tokens: int = _S(0, _int(0, 1 << 20), _CONTEXT_DOC)
    debounce_ms: int = _S(150, _int(0, 10000), "clients wait this long after typing")
    languages: tuple[str, ...] = _S((), _string_list, "languageIds (empty: all)")

    def language_enabled(self, language_id: str) -> bool:
        return self.enabled and (not self.languages or language_id in self.languages)


@dataclass(frozen=True)
class ActionsConfig:
    """Code actions on Code Llama Instruct."""

    enabled: bool = _S(True, _bool, "offer code actions")
    instruct_ckpt_dir: Path | None = _S(None, _optional_path, _INSTRUCT_DOC)  # noqa: RUF009
    use_completion_model: bool = _S(False, _bool, _SHARE_DOC)
    safety_command: tuple[str, ...] = _S((), _command, _SAFETY_DOC)
    safety_timeout_s: float = _S(10.0, _float(0.1, 600), "then the text is refused")
    max_gen_len: int = _S(768, _int(1, 16384), "tokens of an answer")
    temperature: float = _S(0.2, _float(0, 2), "sampling temperature")
    top_p: float = _S(0.95, _float(0, 1), "nucleus sampling")
    refactor_instruction: str = _S(_REFACTOR, _text(2000), "default of Refactor")


@dataclass(frozen=True)
class ServerConfig:
    """The language server process."""

    log_level: LogLevel = _S("info", _choice(*_LEVELS), "document text only at debug")  # noqa: RUF009
    log_file: Path | None = _S(None, _optional_path, "also log to this file")  # noqa: RUF009
    max_message_bytes: int = _S(64 << 20, _int(1 << 16, 1 << 30), "larger: refused")
    max_document_bytes: int = _S(32 << 20, _int(1 << 10, 1 << 30), "larger: no completion")
    cache_entries: int = _S(64, _int(0, 100000), "completions kept to answer typing")


@dataclass(frozen=True)
class ConfigProblem:
    key: str
    message: str
    used: Any = None
    ignored: bool = False  # an unknown key: nothing is "used" instead

    def __str__(self) -> str:
        if self.ignored:
            return f"{self.key}: {self.message}"
        return f"{self.key}: {self.message}; using {_show(self.used)}"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # Problems met while building this config, for the server to show once (not a setting).
    problems: tuple[ConfigProblem, ...] = field(default=(), compare=False)

    def instruct_model(self) -> ModelConfig | None:
        """The Instruct model's settings, or None when the completion model serves actions too
        (or no Instruct model is configured: see `actions_model_missing`)."""
        ckpt = self.actions.instruct_ckpt_dir
        if self.actions.use_completion_model or ckpt is None or self.shares_model():
            return None
        return replace(self.model, ckpt_dir=ckpt, tokenizer_path=None)

    def shares_model(self) -> bool:
        """One worker group serves completion and actions (a 7B/13B Instruct model)."""
        if self.actions.use_completion_model:
            return True
        a, b = self.actions.instruct_ckpt_dir, self.model.ckpt_dir
        return a is not None and b is not None and _same_path(a, b)

    def actions_model_missing(self) -> bool:
        return not self.shares_model() and self.actions.instruct_ckpt_dir is None

    def problems_message(self) -> str:
        if not self.problems:
            return ""
        lines = "\n".join(f"- {p}" for p in self.problems)
        return f"codellama-lsp: some settings were not used:\n{lines}"


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "completion": CompletionConfig,
    "actions": ActionsConfig,
    "server": ServerConfig,
}


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return repr(list(value))
    if isinstance(value, Path):
        return repr(str(value))
    return repr(value)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _norm(key: str) -> str:
    """snake_case, camelCase and kebab-case spellings of a key compare equal."""
    return key.replace("_", "").replace("-", "").lower()


def _section_fields(section: str) -> dict[str, str]:
    """Normalised key -> field name of one section."""
    return {_norm(f.name): f.name for f in fields(SECTIONS[section])}


def _flat_fields() -> dict[str, tuple[str, str]]:
    """Normalised flat key -> (section, field); the first section wins (completion before
    actions for the shared names)."""
    out: dict[str, tuple[str, str]] = {}
    for section in ("model", "completion", "actions", "server"):
        for norm, name in _section_fields(section).items():
            out.setdefault(norm, (section, name))
    return out


# -- building from settings dicts --------------------------------------------------------------
def apply_settings(
    base: Config, settings: Any, *, allow_restart: bool = True
) -> tuple[Config, list[ConfigProblem]]:
    """Apply editor settings (initializationOptions or didChangeConfiguration) on top of `base`.

    Never raises: every invalid or unknown key is reported and skipped. With `allow_restart`
    False (a running server), model settings are reported as needing a restart and skipped.
    """
    problems: list[ConfigProblem] = []
    updates = _collect_updates(settings, problems)
    sections = {name: getattr(base, name) for name in SECTIONS}
    for (section, name), raw in updates.items():
        current = getattr(sections[section], name)
        key = f"{section}.{_camel(name)}"
        try:
            value = _validate(section, name, raw)
        except ValueError as exc:
            problems.append(ConfigProblem(key, str(exc), current))
            continue
        if section in RESTART_SECTIONS and not allow_restart:
            if value != current:
                problems.append(ConfigProblem(key, "takes effect after a restart", current))
            continue
        sections[section] = replace(sections[section], **{name: value})
    config = Config(**sections, problems=tuple(problems))
    return config, problems


def _validate(section: str, name: str, raw: Any) -> Any:
    meta = next(f for f in fields(SECTIONS[section]) if f.name == name).metadata
    return meta["check"](raw)


def _collect_updates(settings: Any, problems: list[ConfigProblem]) -> dict[tuple[str, str], Any]:
    updates: dict[tuple[str, str], Any] = {}
    if settings is None:
        return updates
    if not isinstance(settings, Mapping):
        problems.append(ConfigProblem("settings", "expected an object", "the defaults"))
        return updates
    if isinstance(settings.get("codellama"), Mapping):
        settings = {**settings, **settings["codellama"]}
        settings.pop("codellama")
    flat = _flat_fields()
    for key, value in settings.items():
        if not isinstance(key, str):
            continue
        norm = _norm(key)
        if norm in SECTIONS and isinstance(value, Mapping):
            _collect_section(norm, value, updates, problems)
        elif norm in flat:
            updates[flat[norm]] = value
        elif key != "token":  # the TCP token is read by the transport, not a setting
            problems.append(ConfigProblem(key, "unknown setting, ignored", ignored=True))
    return updates


def _collect_section(
    section: str,
    values: Mapping[Any, Any],
    updates: dict[tuple[str, str], Any],
    problems: list[ConfigProblem],
) -> None:
    known = _section_fields(section)
    for key, value in values.items():
        name = known.get(_norm(key)) if isinstance(key, str) else None
        if name is None:
            problems.append(
                ConfigProblem(f"{section}.{key}", "unknown setting, ignored", ignored=True)
            )
        else:
            updates[(section, name)] = value


# -- the command line --------------------------------------------------------------------------
# (flags, section, field): CLI flags share the validators of the editor settings. "a|b" are
# aliases (the reference's scripts say --tokenizer; --tokenizer-path matches the setting's name).
_MODEL_FLAGS = (
    ("--ckpt-dir", "model", "ckpt_dir"),
    ("--tokenizer|--tokenizer-path", "model", "tokenizer_path"),
    ("--nproc", "model", "nproc"),
    ("--device", "model", "device"),
    ("--dtype", "model", "dtype"),
    ("--max-seq-len", "model", "max_seq_len"),
    ("--max-batch-size", "model", "max_batch_size"),
    ("--kv-cache-tokens", "model", "kv_cache_tokens"),
    ("--kv-cache-fraction", "model", "kv_cache_fraction"),
    ("--fast-kernels", "model", "fast_kernels"),
    ("--graphs-across-ranks", "model", "graphs_across_ranks"),
    ("--peer-all-reduce", "model", "peer_all_reduce"),
    ("--speculative-decoding", "model", "speculative_decoding"),
    ("--load-timeout", "model", "load_timeout_s"),
    ("--request-timeout", "model", "request_timeout_s"),
)
_SERVER_FLAGS = (
    ("--instruct-ckpt-dir", "actions", "instruct_ckpt_dir"),
    ("--safety-command", "actions", "safety_command"),
    ("--fim-format", "completion", "fim_format"),
    ("--log-level", "server", "log_level"),
    ("--log-file", "server", "log_file"),
)


def _dest(section: str, name: str) -> str:
    return f"cfg_{section}__{name}"


def _add_flags(parser: argparse.ArgumentParser, flags: tuple[tuple[str, str, str], ...]) -> None:
    for flag, section, name in flags:
        f = next(f for f in fields(SECTIONS[section]) if f.name == name)
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata['doc']} (default: {_show(default)})"
        # Values stay strings here: the same validators as the editor settings check them.
        names = flag.split("|")
        metavar = names[0].lstrip("-").replace("-", "_").upper()
        parser.add_argument(
            *names, dest=_dest(section, name), metavar=metavar, default=None, help=help_text
        )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--ckpt-dir, --tokenizer, --nproc, --device, --dtype, --max-seq-len, ..."""
    _add_flags(parser, _MODEL_FLAGS)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `serve`: transport, Instruct model, safety checker, logging."""
    _add_flags(parser, _SERVER_FLAGS)
    parser.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        default=None,
        help="serve one client over TCP instead of stdio (host must be loopback unless "
        "--allow-remote and --token-file are given; port 0 picks a free port)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow --tcp on a non-loopback address (needs --token-file)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="file holding the shared secret a TCP client must present "
        '(initializationOptions {"token": ...})',
    )
    parser.add_argument(
        "--settings",
        default=None,
        metavar="JSON",
        help="settings as JSON, same schema as initializationOptions (applied before them)",
    )


def config_from_cli_args(args: argparse.Namespace) -> Config:
    """The config of the flags that `add_model_arguments`/`add_server_arguments` defined.

    Never raises: problems are kept in `Config.problems` for the caller to print or show.
    """
    import json

    problems: list[ConfigProblem] = []
    config = Config()
    raw_settings = getattr(args, "settings", None)
    if raw_settings:
        try:
            config, found = apply_settings(config, json.loads(raw_settings))
            problems.extend(found)
        except ValueError as exc:
            problems.append(ConfigProblem("--settings", f"not JSON ({exc})", "the defaults"))
    nested: dict[str, dict[str, Any]] = {}
    for _flag, section, name in _MODEL_FLAGS + _SERVER_FLAGS:
        value = getattr(args, _dest(section, name), None)
        if value is not None:
            nested.setdefault(section, {})[name] = value
    config, found = apply_settings(config, nested)
    problems.extend(found)
    return replace(config, problems=tuple(problems))


# -- the schema, for editor clients (package.json, config.lua) ---------------------------------
def settings_schema() -> dict[str, dict[str, Any]]:
    """`section.camelName` -> {type, default, description}, for docs and client packages."""
    out: dict[str, dict[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default if f.default is not MISSING else None
            if isinstance(default, Path):
                default = str(default)
            if isinstance(default, tuple):
                default = list(default)
            out[f"{section}.{_camel(f.name)}"] = {
                "type": _type_name(f.type),
                "default": default,
                "description": f.metadata["doc"],
            }
    return out


def _type_name(annotation: Any) -> str:
    text = str(annotation)
    for py, js in (("bool", "boolean"), ("int", "integer"), ("float", "number")):
        if text == py:
            return js
    if "tuple" in text:
        return "array"
    if "Path" in text:
        return "string|null"
    return "string"
