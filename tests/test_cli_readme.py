"""The README's examples are the program's: its Python runs, its method names are accepted,
its commands exist, its exit codes are the ones kvctl uses."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_example_runs():
    [code] = blocks("python")
    exec(compile(code, "README.md", "exec"), {})


def test_codec_table_names_methods_the_controller_accepts():
    from kvctl.codecs import available_methods

    names = re.findall(r"^\| `([a-z0-9-]+)`", README, flags=re.M)
    assert names and set(names) <= set(available_methods())


def test_commands_in_the_table_exist():
    import typer

    from kvctl.cli import app

    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    section = README.split("## Commands", 1)[1].split("\n\n", 1)[0]
    for cell in re.findall(r"^\| `kvctl ([^`]+)`", section, flags=re.M):
        for name in cell.split("[")[0].split(" / "):
            words = name.split()
            cmd = root.get_command(ctx, words[0])
            assert cmd is not None, name
            if len(words) > 1 and hasattr(cmd, "get_command") and words[1].isalpha():
                assert cmd.get_command(ctx, words[1]) is not None, name


def test_exit_code_table_matches_the_code():
    from kvctl import errors

    table = README.split("**Exit codes**", 1)[1].split("\n\n", 2)[1]
    codes = {int(c) for c in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert codes == {errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_USAGE,
                     errors.EXIT_REJECTED, errors.EXIT_INTERRUPTED, errors.EXIT_BROKEN_PIPE}


def test_readme_yaml_is_a_valid_serve_config(tmp_path):
    from kvctl.server.config import build_settings

    [yaml_text] = blocks("yaml")
    path = tmp_path / "example.yaml"
    path.write_text(yaml_text.replace("file:///var/tmp/kvctl/", f"file://{tmp_path}/disk/"))
    s = build_settings(path, {})
    assert s.chunk_size == 256 and s.max_local_disk_size == 20
