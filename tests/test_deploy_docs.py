"""docs/deploy.md works as written: its systemd units pass ``systemd-analyze verify``, and each
``portside`` command in it is one the command line accepts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import IN_CI

from portside.cli import build_parser, make_plan

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DEPLOY.read_text(), flags=re.S)


def _commands() -> list[list[str]]:
    """Every ``portside ...`` command in the shell blocks and the units' ExecStart lines,
    continuation lines joined, up to a shell operator."""
    found = []
    for block in _blocks("sh") + _blocks("ini"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.removeprefix("ExecStart=")
            words = shlex.split(line, comments=True)
            for index, word in enumerate(words):
                if os.path.basename(word) == "portside":
                    command = []
                    for arg in words[index + 1:]:
                        if arg in ("&", "&&", ";", "|"):
                            break
                        command.append(os.path.expanduser(arg))
                    found.append(command)
                    break
    return found


def test_deploy_has_commands_to_check() -> None:
    assert len(_commands()) >= 4


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_every_portside_command_in_the_deploy_guide_parses(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.subcommand in ("echo", "serve", "resp"):
        plan = make_plan(args, {})
        assert plan.listeners


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing in CI: scripts/test installs systemd")
        pytest.skip("systemd-analyze is not installed")
    units = []
    for block in _blocks("ini"):
        first = block.splitlines()[0]
        assert first.startswith("# /etc/systemd/system/"), first
        name = first.rpartition("/")[2]
        text = block
        if not Path("/usr/local/bin/portside").exists():
            # The unit names where pip installs the command system-wide; here it is elsewhere.
            installed = shutil.which("portside") or shutil.which("true") or "/bin/true"
            text = text.replace("/usr/local/bin/portside", installed)
        (tmp_path / name).write_text(text)
        units.append(name)
    assert units == ["portside-echo.socket", "portside-echo.service"]
    done = subprocess.run([analyze, "verify", "--man=no", *units], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "portside-echo" not in done.stderr, done.stderr  # no warnings about our units
