"""README's commands as a newcomer pastes them: the quick start is two commands in a virtual environment,
and every `fmoneshot` example parses and names files that exist in the clone (or that an earlier example
writes). Running them all is Testing/Benchmarks' business: they take minutes."""

import re
import shlex

import pytest

from FMOneShotLib.cli import build_parser

from conftest import REPO


def bash_blocks(text: str) -> list:
    """Each ```bash block as a list of commands (continuation lines joined, comments dropped)."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = body.replace("\\\n", " ")
        blocks.append([line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")])
    return blocks


def test_quick_start_is_two_commands_in_a_virtual_environment():
    quick = bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))[0]
    assert len(quick) == 2
    assert quick[0].startswith("python3 -m venv .venv && . .venv/bin/activate") and "fmoneshot demo" in quick[0]
    assert "pytest" in quick[1]
    assert ".venv/" in (REPO / ".gitignore").read_text(encoding="utf-8").split()


def test_every_command_line_example_parses_and_its_inputs_exist():
    variables, written, checked = {}, set(), 0
    for block in bash_blocks((REPO / "README.md").read_text(encoding="utf-8"))[1:]:
        for command in block:
            if re.fullmatch(r"[A-Z_]+=\S+", command):
                name, value = command.split("=", 1)
                variables[name] = value
                continue
            if not command.startswith("fmoneshot "):
                continue
            for name, value in variables.items():
                command = command.replace(f"${name}", value)
            argv = shlex.split(command)[1:]
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"README example does not parse: {command}")
            inputs = [*getattr(args, "targets", []), *getattr(args, "inputs", []), getattr(args, "template_image", None),
                      getattr(args, "template", None), getattr(args, "dataset", None)]
            for path in filter(None, inputs):
                if path.startswith("../shared/"):
                    continue  # the evaluation data beside the clone; README says so
                assert (REPO / path).exists() or path in written, f"{path} in: {command}"
            written.update(filter(None, [getattr(args, "save_template", None)]))
            checked += 1
    assert checked >= 8
