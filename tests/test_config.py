"""The one typed config: CLI flags and editor settings through the same validators; a bad value
is a reported problem with the safe value used, never an exception."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from codellama_lsp.config import (
    Config,
    add_model_arguments,
    add_server_arguments,
    apply_settings,
    config_from_cli_args,
    settings_schema,
)


def test_defaults_are_the_documented_ones() -> None:
    config = Config()
    assert config.model.ckpt_dir is None and config.model.nproc == 1
    assert config.model.device == "auto" and config.model.dtype == "bfloat16"
    assert config.completion.fim_format == "psm" and config.completion.context_tokens == 0
    assert config.server.log_level == "info"


@pytest.mark.parametrize(
    "settings",
    [
        {"model": {"ckpt_dir": "/m", "max_seq_len": 2048}, "completion": {"fim_format": "spm"}},
        {"model": {"ckptDir": "/m", "maxSeqLen": 2048}, "completion": {"fimFormat": "SPM"}},
        {"ckptDir": "/m", "maxSeqLen": "2048", "fimFormat": "spm"},
        {"codellama": {"model": {"ckpt-dir": "/m", "maxSeqLen": 2048}, "fimFormat": "spm"}},
    ],
    ids=["nested-snake", "nested-camel", "flat", "under-codellama"],
)
def test_every_spelling_of_a_setting_means_the_same(settings: dict[str, object]) -> None:
    config, problems = apply_settings(Config(), settings)
    assert problems == []
    assert config.model.ckpt_dir == Path("/m")
    assert config.model.max_seq_len == 2048
    assert config.completion.fim_format == "spm"


def test_invalid_values_keep_the_previous_value_and_say_so() -> None:
    base, _ = apply_settings(Config(), {"completion": {"temperature": 0.5}})
    config, problems = apply_settings(
        base,
        {
            "completion": {"temperature": "hot", "numCandidates": 0, "languages": 3},
            "model": {"device": "tpu", "nproc": True},
            "actions": {"safetyCommand": ["ok", 5]},
            "nonsense": 1,
        },
    )
    assert config == base  # nothing invalid was taken
    messages = sorted(str(p) for p in problems)
    assert messages == [
        "actions.safetyCommand: expected a command (a string or a list of strings), "
        "got ['ok', 5]; using []",
        "completion.languages: expected a list of strings, got 3; using []",
        "completion.numCandidates: expected an integer between 1 and 8, got 0; using 3",
        "completion.temperature: expected a number, got 'hot'; using 0.5",
        "model.device: expected one of cpu, cuda, auto, got 'tpu'; using 'auto'",
        "model.nproc: expected an integer, got True; using 1",
        "nonsense: unknown setting, ignored",
    ]
    assert "using 0.5" in config.problems_message()


def test_settings_that_are_not_an_object_are_reported() -> None:
    config, problems = apply_settings(Config(), ["not", "an", "object"])
    assert config == Config() and [p.key for p in problems] == ["settings"]
    assert apply_settings(Config(), None) == (Config(), [])


def test_a_running_server_defers_model_settings() -> None:
    config, problems = apply_settings(
        Config(),
        {"model": {"nproc": 2}, "completion": {"maxTokensSingleLine": 9}},
        allow_restart=False,
    )
    assert config.model.nproc == 1 and config.completion.max_tokens_single_line == 9
    assert [str(p) for p in problems] == ["model.nproc: takes effect after a restart; using 1"]


def test_safety_command_is_split_without_a_shell() -> None:
    config, _ = apply_settings(Config(), {"safetyCommand": "checker --strict 'two words'"})
    assert config.actions.safety_command == ("checker", "--strict", "two words")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    add_server_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_share_the_validators() -> None:
    args = _parse(
        [
            "--ckpt-dir",
            "/m",
            "--nproc",
            "0",
            "--dtype",
            "float32",
            "--max-seq-len",
            "1024",
            "--instruct-ckpt-dir",
            "/i",
            "--settings",
            '{"completion": {"numCandidates": 2}}',
        ]
    )
    config = config_from_cli_args(args)
    assert config.model.ckpt_dir == Path("/m") and config.model.dtype == "float32"
    assert config.model.max_seq_len == 1024 and config.model.nproc == 1
    assert config.actions.instruct_ckpt_dir == Path("/i")
    assert config.completion.num_candidates == 2
    assert [str(p) for p in config.problems] == [
        "model.nproc: expected an integer between 1 and 64, got 0; using 1"
    ]


def test_cli_settings_that_are_not_json_are_a_problem() -> None:
    config = config_from_cli_args(_parse(["--settings", "{nope"]))
    assert config.model == Config().model
    assert config.problems[0].key == "--settings"


def test_instruct_model_and_sharing() -> None:
    same, _ = apply_settings(
        Config(), {"ckptDir": "/m/7b-instruct", "instructCkptDir": "/m/7b-instruct"}
    )
    assert same.shares_model() and same.instruct_model() is None
    other, _ = apply_settings(Config(), {"ckptDir": "/m/7b", "instructCkptDir": "/m/7b-instruct"})
    instruct = other.instruct_model()
    assert instruct is not None and instruct.ckpt_dir == Path("/m/7b-instruct")
    assert instruct.tokenizer_file == Path("/m/7b-instruct/tokenizer.model")
    assert Config().actions_model_missing()


def test_schema_lists_every_setting_with_type_and_default() -> None:
    schema = settings_schema()
    assert schema["model.ckptDir"] == {
        "type": "string|null",
        "default": None,
        "description": "Meta-layout checkpoint folder",
    }
    assert schema["completion.maxTokensSingleLine"]["type"] == "integer"
    assert schema["completion.temperature"]["type"] == "number"
    assert schema["completion.languages"] == {
        "type": "array",
        "default": [],
        "description": "languageIds (empty: all)",
    }
    assert schema["actions.useCompletionModel"]["type"] == "boolean"
    assert schema["model.kvCacheTokens"]["type"] == "integer"
    assert schema["model.kvCacheFraction"]["default"] == 0.9
    assert schema["model.fastKernels"] == {
        "type": "boolean",
        "default": True,
        "description": ("CUDA: fused projections, Triton kernels and graphs recorded at start"),
    }
    assert schema["model.graphsAcrossRanks"]["default"] is True
    assert schema["model.speculativeDecoding"]["default"] is False
    assert schema["model.peerAllReduce"]["default"] is False
    assert len(schema) == 44
    assert schema["model.hangTimeoutS"]["type"] == "number"
