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
    assert users == ["finetune/track/tracking.py"]


def test_no_unsafe_loading_in_the_packages():
    bad = []
    for folder in ("finetune", "inference"):
        for p in (REPO / folder).rglob("*.py"):
            text = p.read_text(encoding="utf-8")
            for needle in ("yaml.load(", "pickle.load", "trust_remote_code=True", "torch.load("):
                if needle in text:
                    bad.append(f"{p.relative_to(REPO)}: {needle}")
    assert not bad, bad


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function alike (a lazy import that dodges a
    cycle is still one), ``from pkg import mod`` counted as an import of ``pkg.mod``."""
    paths = {_module_name(p): p for folder in ("finetune", "inference") for p in (REPO / folder).rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                edges.update(known(f"{base}.{a.name}") if f"{base}.{a.name}" in paths else known(base)
                             for a in node.names)
        graph[name] = {e for e in edges if e and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) >= 40 and sum(map(len, graph.values())) >= 80   # the scan really saw the tree
    assert cycles(graph) == []
    # the check itself finds a cycle where there is one, however long
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def training_code(path: Path) -> list[str]:
    """What in ``path`` is training-only: peft/trl imports, autograd functions and custom backward passes, tensor
    subclasses (PEFT's view of packed weights)."""
    where = path.relative_to(REPO)
    found = [f"{where}: imports {m}" for m in imported_modules(path) if m.split(".")[0] in ("peft", "trl")]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            if bases & {"torch.autograd.Function", "Function", "torch.Tensor"}:
                found.append(f"{where}: class {node.name}({', '.join(sorted(bases))})")
        elif isinstance(node, ast.Attribute) and node.attr in ("register_autograd", "__torch_dispatch__"):
            found.append(f"{where}: {ast.unparse(node)}")
        elif isinstance(node, ast.FunctionDef) and node.name in ("backward", "__torch_dispatch__"):
            found.append(f"{where}: def {node.name}")
    return found


def test_the_runtime_holds_no_training_code():
    """inference/ defines no autograd (custom backward passes, tensor subclasses for PEFT) and imports no peft/trl:
    training's kernels live in finetune/kernels/."""
    bad = [line for path in (REPO / "inference").rglob("*.py") for line in training_code(path)]
    assert not bad, bad
    # the scan sees training code where it is
    kernels = {path.name: training_code(path) for path in (REPO / "finetune" / "kernels").glob("*.py")}
    assert all(kernels[name] for name in ("experts.py", "attention.py", "loss.py", "packed.py")), kernels


def test_library_behaviour_is_changed_in_one_module():
    """finetune/model/fastpath.py is the one seam (its PATCHES table): no other module switches transformers'
    attention or experts implementation, PEFT's input up-cast, an instance forward or the checkpointing function."""
    needles = ("set_attn_implementation(", "set_experts_implementation(", "cast_input_dtype_enabled",
               ".forward = ", "MethodType(", "_gradient_checkpointing_func", "checkpointing_enable(",
               "_compiled_call_impl", ".compile(dynamic")
    seam = REPO / "finetune" / "model" / "fastpath.py"
    found = {str(p.relative_to(REPO)): [n for n in needles if n in p.read_text(encoding="utf-8")]
             for folder in ("finetune", "inference") for p in (REPO / folder).rglob("*.py")}
    assert {k: v for k, v in found.items() if v and k != str(seam.relative_to(REPO))} == {}
    assert len(found[str(seam.relative_to(REPO))]) >= 6          # the scan sees the seam's own changes


def test_every_package_says_what_it_owns_and_may_import():
    packages = sorted(p for folder in ("finetune", "inference") for p in (REPO / folder).rglob("__init__.py"))
    assert len(packages) >= 8
    for init in packages:
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert len(doc) > 80 and "may import" in doc.lower(), init.relative_to(REPO)
