"""Options shared by several commands, declared once (Annotated aliases).

The settings (--controller, --timeout, --tokenizer, --instance-id) and --json are global
options of the root command (kvctl/cli.py), accepted before or after the subcommand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

MethodOpt = Annotated[str, typer.Option(
    "--method", "-m", metavar="METHOD", show_default=True,
    help="Codec (kvctl codecs lists them).")]
LocationOpt = Annotated[str, typer.Option(
    "--location", "-l", metavar="LOCATION", show_default=True,
    help="Storage location: LocalCPUBackend, LocalDiskBackend, RemoteBackend.")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", "-w", help="Follow the event with a progress bar; exit 0 only if it finished.")]

PromptArg = Annotated[str | None, typer.Argument(
    metavar="PROMPT", show_default=False,
    help="Prompt text, tokenized locally; '-' reads it from stdin exactly, a final newline "
         "included (printf '%s' \"$P\" | ... for one without).")]
TokensOpt = Annotated[str | None, typer.Option(
    "--tokens", metavar="IDS", show_default=False,
    help="Token ids instead of a prompt: 1,2,3 (commas or spaces).")]
TokensFileOpt = Annotated[Path | None, typer.Option(
    "--tokens-file", metavar="FILE", show_default=False, dir_okay=False, allow_dash=True,
    help="File of token ids ('-' = stdin): 1,2,3 / whitespace-separated / a JSON list / "
         "vLLM's /tokenize reply.")]
