"""Every `handseg` command shown in the README and in examples/ parses against the real CLI: the
subcommand exists, every option exists, and every value has the right type."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[str]:
    """`handseg ...` invocations in shell code: continuation lines joined, comments and variables kept
    as words (``$DATA`` parses as a path), ``torchrun ... -m handseg`` reduced to its handseg part."""
    lines, out = text.replace("\\\n", " ").splitlines(), []
    for line in lines:
        line = line.strip()
        if line.startswith(("#", "```")):
            continue
        m = re.search(r"(?:^|\s)(?:-m )?handseg\s+(\S.*)$", line)
        if m is None or "python" in line.split("handseg")[0] and "-m" not in line:
            continue
        body = m.group(1).split(" # ")[0].split("  #")[0].strip()
        body = body.split(" && ")[0].split(" | ")[0].split(" ; ")[0]
        if body.startswith(("(", "...", "demo --out demo &&")):
            continue
        out.append(body)
    return out


def _shell_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", markdown, flags=re.S))


def _parse(argv: list[str]) -> None:
    from typer.main import get_command

    from handseg.cli import app
    from handseg.commands.train import expand_list_options

    cmd = get_command(app)
    ctx = cmd.make_context("handseg", expand_list_options(list(argv)))
    while hasattr(cmd, "resolve_command"):
        rest = list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])) + list(ctx.args)
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)


SOURCES = {"README.md": _shell_blocks((ROOT / "README.md").read_text()),
           **{f"examples/{p.name}": p.read_text() for p in sorted((ROOT / "examples").glob("*.sh"))}}
COMMANDS = [(src, c) for src, text in SOURCES.items() for c in _commands(text)]


def test_the_docs_show_commands():
    assert len([c for src, c in COMMANDS if src == "README.md"]) >= 15
    assert any(src.startswith("examples/") for src, _ in COMMANDS)


@pytest.mark.parametrize("source,command", COMMANDS, ids=[f"{s}:{c[:60]}" for s, c in COMMANDS])
def test_every_documented_command_parses(source, command):
    command = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}?", "0", command)  # shell variables: a value
    words = [w for w in shlex.split(command) if w != "..."]
    _parse(words)
