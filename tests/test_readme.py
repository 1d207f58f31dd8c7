"""Every command the README shows, run as written. Elsewhere: the setup-and-run command (test_end_to_end.py), the
Python snippet, the sweep and the UI commands (test_workflow.py), the export command (test_export.py)."""

from __future__ import annotations

import re

from conftest import REPO, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_table_commands_answer(tmp_path):
    commands = re.findall(r"\| `python -m finetune (\w+)", README)
    assert {"run", "validate", "estimate", "preview", "sweep", "compare", "ui", "export"} <= set(commands)
    for command in commands:
        assert run_cli("finetune", command, "--help").returncode == 0, command
    proc = run_cli("finetune", "validate", "recipes/tiny-cpu.yaml", "train.lr=1e-4", "--print")
    assert proc.returncode == 0 and "lr: 0.0001" in proc.stdout


def test_readme_estimate_example_is_the_real_output(tmp_path):
    """The estimate shown in the README, run as written with a directory holding gpt-oss-20b's config.json in place
    of /models/gpt-oss-20b: the same table, line for line."""
    import json

    from benchmarks.qlora_memory import config_for
    block = re.search(r"```\n\$ (python -m finetune estimate [^\n]+)\n(.*?)```", README, re.S)
    command, shown = block.group(1), block.group(2)
    (tmp_path / "config.json").write_text(json.dumps(config_for("20b").to_dict()), encoding="utf-8")
    args = command.replace("/models/gpt-oss-20b", str(tmp_path)).split()[3:]
    proc = run_cli("finetune", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == shown.strip()
