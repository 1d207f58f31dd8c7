"""Every command the README shows, run as written. Elsewhere: the setup-and-run command (test_end_to_end.py), the
Python snippet, the sweep and the UI commands (test_workflow.py), the export command (test_export.py)."""

from __future__ import annotations

import re

from conftest import REPO, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_table_commands_answer(tmp_path):
    """Every command of the README's tables answers --help, and takes every option its row shows (a renamed or
    dropped flag fails here, not in a user's hands)."""
    rows = re.findall(r"^\| `python -m (finetune|inference) (\w+)([^`]*)`", README, re.M)
    assert {"run", "validate", "estimate", "preview", "sweep", "compare", "ui", "export"} <= {c for _, c, _ in rows}
    for package, command, usage in rows:
        helped = run_cli(package, command, "--help")
        assert helped.returncode == 0, (package, command)
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helped.stdout), (command, flag)
    proc = run_cli("finetune", "validate", "recipes/tiny-cpu.yaml", "train.lr=1e-4", "--print")
    assert proc.returncode == 0 and "lr: 0.0001" in proc.stdout


def test_readme_estimate_example_is_the_real_output(tmp_path):
    """The estimate shown in the README, run as written on a machine without gpt-oss-20b (an empty hub cache,
    offline): the same table, line for line, from the published config this project carries, and exit status 0
    (it fits); on a smaller card the same command exits 1."""
    block = re.search(r"```\n\$ (python -m finetune estimate [^\n]+)\n(.*?)```", README, re.S)
    command, shown = block.group(1), block.group(2)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("finetune", *command.split()[3:], env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == shown.strip()
    smaller = run_cli("finetune", *command.split()[3:-1], "12", env=env)
    assert smaller.returncode == 1 and "fits: NO" in smaller.stdout
