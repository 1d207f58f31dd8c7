"""Layering is a rule, not a wish: inference/ never imports finetune/, and mlflow lives in one module."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_inference_never_imports_finetune():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "finetune")
                 for p in (REPO / "inference").rglob("*.py")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"inference/ must not import finetune/: {offenders}"
    assert len(list((REPO / "inference").rglob("*.py"))) >= 5  # the scan really looked at the package


def test_only_the_tracking_module_imports_mlflow():
    users = sorted(str(p.relative_to(REPO)) for folder in ("finetune", "inference")
                   for p in (REPO / folder).rglob("*.py")
                   if any(m.split(".")[0] == "mlflow" for m in imported_modules(p)))
    assert users == ["finetune/tracking.py"]


def test_no_unsafe_loading_in_the_packages():
    bad = []
    for folder in ("finetune", "inference"):
        for p in (REPO / folder).rglob("*.py"):
            text = p.read_text(encoding="utf-8")
            for needle in ("yaml.load(", "pickle.load", "trust_remote_code=True", "torch.load("):
                if needle in text:
                    bad.append(f"{p.relative_to(REPO)}: {needle}")
    assert not bad, bad
