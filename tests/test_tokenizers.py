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


# Texts where tokenizers commonly disagree: leading spaces, special-token text, unicode,
# whitespace runs, the empty prompt.
TEXTS = [SEED_PROMPT, " leading space", "<|im_start|>user\nhi<|im_end|>",
         "<|begin_of_text|>twice", "naïve café 日本語 🙂", "a\n\n  b\t c", "", "x" * 3000]


def test_llama3_reproduces_the_seed_ids(llama3):
    assert encode_prompt(llama3, SEED_PROMPT) == SEED_IDS


def test_llama3_special_tokens(llama3):
    assert [llama3.token_to_id(t) for t in ["<|begin_of_text|>", "<|end_of_text|>",
                                            "<|eot_id|>", "<|reserved_special_token_245|>"]
            ] == [128000, 128001, 128009, 128255]
    assert llama3.vocab_size == 128256
    assert llama3.decode(SEED_IDS, skip_special_tokens=True) == SEED_PROMPT


@pytest.mark.parametrize("name", ["llama3", "smollm2", "gemma3"])
def test_same_ids_as_transformers(name):
    """The fast path (tokenizers on a cached tokenizer.json) against transformers' own
    tokenizer object for the same model."""
    from transformers import PreTrainedTokenizerFast

    from kvctl.common import tokenizers
    from kvctl.common.model import load_tokenizer_for

    if name == "llama3":
        tokenizers.load_llama3()  # make sure the converted file exists
        ref = PreTrainedTokenizerFast(tokenizer_file=str(tokenizers.llama3_cache_file()))
    else:
        ref = load_tokenizer_for(name)  # what the engine encodes with
    tok = load_tokenizer(name)
    for text in TEXTS:
        assert tok.encode(text) == list(ref(text, add_special_tokens=True)["input_ids"]), text


def test_fast_path_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys\n"
            "from kvctl.common.tokenizers import load_tokenizer\n"
            "for name in ('llama3', 'smollm2'):\n"
            "    load_tokenizer(name).encode('hello')\n"
            "print('transformers' in sys.modules, 'torch' in sys.modules)\n")
    load_tokenizer("llama3"), load_tokenizer("smollm2")  # the caches exist now
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.split() == ["False", "False"]


def test_llama3_conversion_is_cached(llama3, tmp_path, monkeypatch):
    from kvctl.common import tokenizers

    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path))
    tok = tokenizers.load_llama3()
    [cached] = list((tmp_path / "tokenizers").glob("llama3-*/tokenizer.json"))
    assert cached.stat().st_size > 1_000_000
    assert not list(cached.parent.glob(".*.tmp"))  # atomic_write left no temporary file
    again = tokenizers.load_llama3()  # now read from the cached file
    assert encode_prompt(tok, SEED_PROMPT) == encode_prompt(again, SEED_PROMPT) == SEED_IDS


def test_smollm2_matches_the_engine(smollm2_tokenizer):
    tok = load_tokenizer("smollm2")
    assert encode_prompt(tok, SEED_PROMPT) == list(smollm2_tokenizer(SEED_PROMPT)["input_ids"])


def test_tokenizer_json_and_directory(llama3, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("KVCTL_CACHE_DIR", str(tmp_path / "cache"))
    hf = PreTrainedTokenizerFast(tokenizer_object=llama3.backend, bos_token="<|begin_of_text|>")
    hf.save_pretrained(tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer.json"
    assert encode_prompt(load_tokenizer(str(path)), SEED_PROMPT) == SEED_IDS
    assert encode_prompt(load_tokenizer(str(tmp_path / "tok")), SEED_PROMPT) == SEED_IDS
    # a directory is converted once, then read from kvctl's cache
    assert len(list((tmp_path / "cache" / "tokenizers").glob("dir-*/tokenizer.json"))) == 1


def test_bad_tokenizer_json_is_a_tokenizer_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(TokenizerError, match=r"not a tokenizer\.json"):
        load_tokenizer(str(bad))
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(TokenizerError, match=r"expected a \.gguf file"):
        load_tokenizer(str(other))


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
    r = CliRunner().invoke(app, ["tokenize", "-t", "llama3", "-"], input=SEED_PROMPT)
    assert r.exit_code == 0
    assert r.stdout.strip() == ",".join(map(str, SEED_IDS)) and "12 tokens" in r.stderr
    # stdin is read exactly: a final newline is part of the prompt (".\n" is one token)
    r = CliRunner().invoke(app, ["tokenize", "-t", "llama3", "-"], input=SEED_PROMPT + "\n")
    assert r.stdout.strip() == ",".join(map(str, [*SEED_IDS[:-1], 627]))


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
