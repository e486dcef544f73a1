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

# LMCache MP fleets (--coordinator): what, besides the tokens, names a chunk on a server
ModelNameOpt = Annotated[str | None, typer.Option(
    "--model-name", metavar="NAME", envvar="KVCTL_MODEL_NAME", show_default=False,
    help="Model name the MP servers store KV under (vLLM's served model name); with "
         "--coordinator. \\[env KVCTL_MODEL_NAME]")]
WorldSizeOpt = Annotated[int, typer.Option(
    "--world-size", metavar="N", min=1, max=255,
    help="Tensor x pipeline parallel size of the serving engine; with --coordinator.")]
CacheSaltOpt = Annotated[str, typer.Option(
    "--cache-salt", metavar="SALT", help="Per-tenant cache salt; with --coordinator.")]
