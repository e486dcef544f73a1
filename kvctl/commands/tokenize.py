"""`kvctl tokenize`: a prompt's token ids, as the serving engine's /tokenize reports them."""

from __future__ import annotations

from typing import Annotated

import typer

from kvctl import output
from kvctl.commands._common import read_prompt
from kvctl.commands._common import tokenize as encode
from kvctl.errors import UsageError
from kvctl.options import JsonOpt, TokenizerOpt
from kvctl.settings import resolve


def tokenize(
    prompt: Annotated[str, typer.Argument(
        metavar="PROMPT", help="Prompt text; '-' reads it from stdin.")],
    tokenizer: TokenizerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize a prompt locally (special tokens added, as vLLM's /tokenize does)."""
    text = read_prompt(prompt)
    if not text:
        raise UsageError("the prompt is empty")
    spec = tokenizer or resolve().tokenizer or "smollm2"
    ids = encode(text, spec)
    if as_json:
        output.print_json({"count": len(ids), "tokens": ids, "tokenizer": spec})
        return
    # ids alone on stdout, so `--tokens "$(kvctl tokenize ...)"` works
    output.out().print(",".join(map(str, ids)), soft_wrap=True)
    output.note(f"{len(ids)} tokens ({spec})")
