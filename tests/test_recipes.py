"""recipes/ holds scripts over the library; the library never imports them (the CLI only launches them)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_never_imports_recipes():
    offenders = []
    for path in sorted((ROOT / "vlmcook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "recipes"]
    assert not offenders, offenders


def test_cli_launches_the_demo_recipe(monkeypatch):
    """`vlmcook demo` runs recipes/demo.py's run() with the flags it was given."""
    from vlmcook import cli

    calls = []
    mod = cli._recipe("demo")
    monkeypatch.setattr(mod, "run", lambda **kw: calls.append(kw))
    assert cli.main(["demo", "--quick", "--out", "x", "--seed", "3"]) == 0
    assert calls == [{"out": "x", "seed": 3, "quick": True, "steps": None}]
