"""The layout's rules, read from the code itself: who may import whom, no import circle, few files at the top.

    python -m pytest -q tests/test_layout.py
"""

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The lessons in the order a learner meets them; an import may only point to an earlier one (or to gptkit, config,
# model and lora, which every lesson may use).
LESSONS = ["config", "model", "lora", "data", "train", "generate", "classify", "instruct", "dpo", "rl", "chat", "serve",
           "tour"]
FOUNDATIONS = {"config", "model", "lora"}  # below gptkit: they import nothing of the project but each other


def project_modules() -> dict[str, Path]:
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for package in ("gptkit", "tools"):
        modules.update({f"{package}.{p.stem}": p for p in (REPO / package).glob("*.py") if p.stem != "__init__"})
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(the project module imported, whether the import sits inside a function) for every import in a file."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            found.extend((name, inside) for name in names if name in modules)
            visit(child, inside)
    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target, _ in imports_of(path, modules)} - {name} for name, path in modules.items()}


def layer(name: str) -> str:
    if name.startswith("gptkit."):
        return "gptkit"
    if name.startswith("tools."):
        return "tools"
    return "foundation" if name in FOUNDATIONS else "lesson"


def test_the_top_level_holds_only_the_lessons_in_learning_path_order():
    top = sorted(path.stem for path in REPO.glob("*.py"))
    assert len(top) <= 16 and set(top) <= set(LESSONS), top


def test_no_import_circle_even_through_imports_inside_functions():
    graph = import_graph()
    visiting, done, circles = [], set(), []

    def walk(name: str) -> None:
        if name in visiting:
            circles.append(visiting[visiting.index(name):] + [name])
            return
        if name in done:
            return
        visiting.append(name)
        for target in sorted(graph[name]):
            walk(target)
        visiting.pop()
        done.add(name)
    for name in sorted(graph):
        walk(name)
    assert circles == []


def test_imports_run_one_way_lessons_over_gptkit_over_the_foundations_and_tools_on_top():
    wrong = []
    for name, targets in import_graph().items():
        for target in targets:
            if layer(name) == "foundation" and layer(target) != "foundation":
                wrong.append(f"{name} -> {target}: config, model and lora import only each other")
            elif layer(name) == "gptkit" and layer(target) in ("lesson", "tools"):
                wrong.append(f"{name} -> {target}: the support package never imports a lesson or a tool")
            elif layer(name) == "lesson" and layer(target) == "tools":
                wrong.append(f"{name} -> {target}: a lesson never imports a tool")
            elif layer(name) == "tools" and layer(target) == "tools":
                wrong.append(f"{name} -> {target}: a tool never imports another tool (run it as a child process)")
            elif layer(name) == layer(target) == "lesson" and LESSONS.index(target) > LESSONS.index(name):
                wrong.append(f"{name} -> {target}: a lesson imports only the lessons before it")
    assert wrong == []


def test_no_project_module_is_imported_inside_a_function():
    modules = project_modules()
    hidden = [f"{path.relative_to(REPO)}: {target}" for path in modules.values()
              for target, inside in imports_of(path, modules) if inside]
    assert hidden == []


def test_the_checker_sees_a_circle_hidden_in_a_function(tmp_path, monkeypatch):
    """The rules above would pass vacuously if the reader missed imports; a planted circle must be found."""
    (tmp_path / "gptkit").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "data.py").write_text("import train\n")
    (tmp_path / "train.py").write_text("def later():\n    import data\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    graph = import_graph()
    assert graph["data"] == {"train"} and graph["train"] == {"data"}
    assert imports_of(tmp_path / "train.py", project_modules()) == [("data", True)]
