"""`kvctl tokenize`: a prompt's token ids, as the serving engine's /tokenize reports them."""

from __future__ import annotations

from typing import Annotated

import typer

from kvctl.commands._common import read_prompt
from kvctl.commands._common import tokenize as encode
from kvctl.errors import UsageError
from kvctl.state import state


def tokenize(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(
        metavar="PROMPT", help="Prompt text; '-' reads it from stdin exactly, a final "
                               "newline included.")],
) -> None:
    """Tokenize a prompt locally (special tokens added, as vLLM's /tokenize does).

    Prints the ids comma-separated, ready for `--tokens`; the tokenizer is the global
    --tokenizer setting (smollm2, the model kvctl serve runs, by default).
    """
    st = state(ctx)
    text = read_prompt(prompt)
    if not text:
        raise UsageError("the prompt is empty")
    ids = encode(st, text)
    spec = st.settings.tokenizer
    # ids alone on stdout, so `--tokens "$(kvctl tokenize ...)"` works
    st.out.result({"count": len(ids), "tokens": ids, "tokenizer": spec},
                  lambda: ",".join(map(str, ids)))
    if not st.out.json:
        st.out.note(f"{len(ids)} tokens ({spec})")
