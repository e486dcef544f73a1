"""Tokenizer resolution: the built-ins reproduce the serving engine's ids exactly."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvctl.cli import app
from kvctl.commands._common import parse_token_ids
from kvctl.common.tokenizers import TokenizerError, encode_prompt, load_tokenizer
from kvctl.errors import UsageError

SEED_PROMPT = "Explain the significance of KV cache in language models."
SEED_IDS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]


@pytest.fixture(scope="session")
def llama3():
    return load_tokenizer("llama3")


def test_llama3_reproduces_the_seed_ids(llama3):
    assert encode_prompt(llama3, SEED_PROMPT) == SEED_IDS


def test_llama3_special_tokens(llama3):
    assert llama3.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                                         "<|reserved_special_token_245|>"]) == [
        128000, 128001, 128009, 128255]
    assert len(llama3) == 128256
    assert llama3.decode(SEED_IDS, skip_special_tokens=True) == SEED_PROMPT


def test_llama3_conversion_is_cached(llama3, tmp_path, monkeypatch):
    from kvctl.common import tokenizers

    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path))
    tok = tokenizers.load_llama3()
    [cached] = list((tmp_path / "tokenizers").glob("llama3-*/tokenizer.json"))
    again = tokenizers.load_llama3()  # now read from the cached file
    assert encode_prompt(tok, SEED_PROMPT) == encode_prompt(again, SEED_PROMPT) == SEED_IDS
    assert cached.stat().st_size > 1_000_000


def test_smollm2_matches_the_engine(smollm2_tokenizer):
    tok = load_tokenizer("smollm2")
    assert encode_prompt(tok, SEED_PROMPT) == list(smollm2_tokenizer(SEED_PROMPT)["input_ids"])


def test_tokenizer_json_and_directory(llama3, tmp_path):
    llama3.save_pretrained(tmp_path / "tok")
    assert encode_prompt(load_tokenizer(str(tmp_path / "tok")), SEED_PROMPT) == SEED_IDS
    path = tmp_path / "tok" / "tokenizer.json"
    assert encode_prompt(load_tokenizer(str(path)), SEED_PROMPT) == SEED_IDS


def test_unknown_hub_id_says_nothing_is_downloaded():
    with pytest.raises(TokenizerError, match="nothing is downloaded"):
        load_tokenizer("no-such-org/no-such-model")


def test_tokenize_command_json(llama3):
    r = CliRunner().invoke(app, ["tokenize", "--tokenizer", "llama3", "--json", SEED_PROMPT])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith('{"count": 12, "tokens": [128000, 849, 21435, 279, 26431, 315, '
                               '85748, 6636, 304, 4221, 4211, 13]')
    assert json.loads(r.stdout)["tokenizer"] == "llama3"


def test_tokenize_command_plain_and_stdin(llama3):
    r = CliRunner().invoke(app, ["tokenize", "-t", "llama3", "-"], input=SEED_PROMPT + "\n")
    assert r.exit_code == 0
    assert r.stdout.strip() == ",".join(map(str, SEED_IDS)) and "12 tokens" in r.stderr


def test_tokenize_bad_tokenizer_is_one_line():
    r = CliRunner().invoke(app, ["tokenize", "-t", "no-such-org/x", "hi"])
    assert r.exit_code == 1 and r.stderr.startswith("error: tokenizer 'no-such-org/x'")


@pytest.mark.parametrize("text,ids", [
    ("1,2,3", [1, 2, 3]), ("1 2\n3", [1, 2, 3]), (" [1, 2] ", [1, 2]),
    ('{"count": 1, "tokens": [7]}', [7]),
])
def test_parse_token_ids(text, ids):
    assert parse_token_ids(text) == ids


@pytest.mark.parametrize("text", ["", "1,a", "[1, true]", '{"x": 1}', "[", "-3"])
def test_parse_token_ids_rejects(text):
    with pytest.raises(UsageError):
        parse_token_ids(text)
