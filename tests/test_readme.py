"""Every command the README shows, run as written. Elsewhere: the setup-and-run command (test_end_to_end.py), the
Python snippet, the sweep and the UI commands (test_workflow.py), the export command (test_export.py)."""

from __future__ import annotations

import re

from conftest import REPO, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_table_commands_answer(tmp_path):
    commands = re.findall(r"\| `python -m finetune (\w+)", README)
    assert {"run", "validate", "preview", "sweep", "compare", "ui", "export"} <= set(commands)
    for command in commands:
        assert run_cli("finetune", command, "--help").returncode == 0, command
    proc = run_cli("finetune", "validate", "recipes/tiny-cpu.yaml", "train.lr=1e-4", "--print")
    assert proc.returncode == 0 and "lr: 0.0001" in proc.stdout
