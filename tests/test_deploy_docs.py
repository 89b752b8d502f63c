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


def _yaml_value(block: str, key: str) -> str:
    match = re.search(rf"^\s*{key}:\s*(.+)$", block, flags=re.M)
    assert match, key
    return match.group(1).strip()


def test_the_kubernetes_deployment_fits_its_drain_and_probes_the_metrics_port() -> None:
    """The Deployment's command is one portside accepts; its probes ask /healthz and /readyz
    on the port --metrics names; the grace period outlasts preStop, drain and linger."""
    import json

    (block,) = [block for block in _blocks("yaml") if "kind: Deployment" in block]
    argv = json.loads(_yaml_value(block, "command"))
    assert argv[0] == "portside"
    args = build_parser().parse_args(argv[1:])
    plan = make_plan(args, {})
    assert plan.process.workers and plan.process.metrics
    metrics_port = int(plan.process.metrics.rpartition(":")[2])
    assert f"{{name: metrics, containerPort: {metrics_port}}}" in block
    assert "httpGet: {path: /healthz, port: metrics}" in block
    assert "httpGet: {path: /readyz, port: metrics}" in block
    hook = re.search(r"preStop:\s*exec:\s*command: (\[.*\])", block)
    assert hook is not None
    pre_stop = json.loads(hook.group(1))
    assert pre_stop[0] == "sleep"
    grace = int(_yaml_value(block, "terminationGracePeriodSeconds"))
    needed = float(pre_stop[1]) + plan.server.drain_timeout + plan.server.linger_timeout
    assert grace >= needed + 5, (grace, needed)


def test_the_haproxy_configurations_pass_haproxy_check(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    blocks: list[str] = []
    current: list[str] | None = None
    inside = False
    for line in DEPLOY.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if inside and current is not None:
                blocks.append("".join(current))
            current = [] if not inside and line.strip() == "```" else None
            inside = not inside
            continue
        if current is not None:
            current.append(line)
    blocks = [block for block in blocks if block.startswith("# /etc/haproxy/haproxy.cfg")]
    assert len(blocks) >= 2 and any("uri /readyz" in block for block in blocks)
    for index, block in enumerate(blocks):
        if "\ndefaults" not in block:  # a fragment: the backend alone
            block = ("defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n"
                     "    timeout server 60s\n" + block)
        config = tmp_path / f"haproxy{index}.cfg"
        config.write_text(block)
        done = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True,
                              text=True, timeout=60)
        # A backend alone has no listener: "no error but will not start" (status 2) is a pass.
        assert done.returncode == 0 or "has no error" in done.stdout, done.stdout + done.stderr
        assert "WARNING" not in done.stdout + done.stderr, done.stdout + done.stderr
