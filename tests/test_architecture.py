"""The package's layout, kept by tests: the import contracts (.importlinter) hold, every room's
public names resolve, a training rank loads none of the parent's modules, and each step stays a
short script (parse -> set up -> run -> log)."""
from __future__ import annotations

import ast
import importlib
import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from helpers import ROOT

ROOMS = ("dolly.data", "dolly.models", "dolly.train", "dolly.eval", "dolly.registry",
         "dolly.serve", "dolly.scoring")

# What a rank process imports of this project: dolly/train/rank.py's own imports and those of its
# train() and main() (kept in step with that file).
RANK_IMPORTS = """
import dolly.train.rank
from dolly.data import CompletionCollator, load_prepared
from dolly.models import load_base_model
from dolly.prompts import special_ids
from dolly.tokenizer import load_tokenizer
from dolly.train.trainer import (DollyTrainer, PartitionRecord, RankZeroMlflow, param_numel,
                                 rank_and_world)
from dolly.train import throughput
from dolly.train.torchrun_guard import die_with_parent
from dolly.tracking import local_path
from dolly import cli
"""
PARENT_SIDE = ("dolly.train.launch", "dolly.train.spark", "dolly.train.checkpoints",
               "dolly.train.memory_plan", "dolly.pipeline", "steps")


def test_the_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " 0 broken" in output, output


@pytest.mark.parametrize("room", ROOMS)
def test_every_public_name_of_a_room_resolves(room):
    module = importlib.import_module(room)
    assert module.__all__, f"{room} names no public API"
    missing = []
    for name in module.__all__:
        try:
            getattr(module, name)
        except (AttributeError, ImportError) as e:
            missing.append(f"{name}: {type(e).__name__}: {e}")
    assert not missing, f"{room}.__all__ names what does not resolve:\n" + "\n".join(missing)


def test_a_training_rank_loads_none_of_the_parents_modules():
    script = RANK_IMPORTS + (
        "import json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('dolly', 'steps'))))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "dolly.train.rank" in loaded and "dolly.train.trainer" in loaded  # it ran the imports
    wrong = [m for m in loaded if any(m == p or m.startswith(p + ".") for p in PARENT_SIDE)]
    assert not wrong, f"a rank loads {wrong}; all it loads: {loaded}"


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not comments, not part of a docstring."""
    source = path.read_text(encoding="utf-8")
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    code: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - docstrings)


def test_code_lines_counts_neither_docstrings_comments_nor_blank_lines(tmp_path):
    script = tmp_path / "step.py"
    script.write_text('"""A step.\n\nIt does one thing."""\n'
                      'import os  # the os\n'
                      '\n'
                      '\n'
                      'def main():\n'
                      '    """Run it."""\n'
                      '    # parse\n'
                      '    x = (1,\n'
                      '         2)\n'
                      '    return x, """not a\n'
                      'docstring"""\n')
    assert code_lines(script) == 6  # import, def, the two lines of x, the two of the string


def test_every_step_is_a_short_script():
    counts = {p.name: code_lines(p) for p in sorted((ROOT / "steps").glob("*.py"))}
    assert "train.py" in counts and "main.py" in counts
    long = {name: n for name, n in counts.items() if n >= 100}
    assert not long, (f"steps over 100 code lines (a step parses, sets up, runs and logs: the "
                      f"work belongs in dolly/): {long}; all: {counts}")


def test_test_modules_have_unique_basenames():
    # pytest imports test files without packages (pytest.ini: pythonpath = . tests, no
    # __init__.py), so a module is known by its basename alone: two files of one name in
    # different folders stop collection of the whole suite ("import file mismatch").
    by_name: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        by_name.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {n: p for n, p in by_name.items() if len(p) > 1} == {}
