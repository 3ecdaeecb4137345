"""The default run as a new user makes it (`mlflow run .`, nothing else), and the examples the
README and the docs print: every one is what the default champion actually answers.

Examples are found, not listed here: every row of a table between `<!-- examples:start -->` and
`<!-- examples:end -->` (columns instruction, input, answer; cells in backticks) and every
`-d '{"inputs": [...], "params": {...}}'` request followed by a `# -> {"predictions": [...]}`
line, and every OpenAI client call of one user message followed by
`print(r.choices[0].message.content)  # -> answer` (temperature 0: greedy; at temperature 0
the OpenAI route answers as predict does, tests/e2e/test_openai_server.py), in README.md and
docs/*.md.
"""
from __future__ import annotations

import json
import re

import mlflow
import pytest

from helpers import ROOT, free_port, mlflow_run, project_copy, runs_in

GREEDY = {"do_sample": False, "max_new_tokens": 32}


def documented_examples() -> list[tuple[str, str, str | None, str, dict, str | None]]:
    """(file, instruction, input or None, answer, params, "yes"/"no" of a "never seen" column or
    None) for every example in the docs."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"<!-- examples:start -->(.*?)<!-- examples:end -->", text, re.S):
            for row in block.strip().splitlines()[2:]:  # header and rule first
                cells = [c.strip() for c in row.strip().strip("|").split("|")]
                instruction, input_, answer = (c.strip("`") for c in cells[:3])
                unseen = cells[3] if len(cells) > 3 else None
                found.append((path.name, instruction, input_ or None, answer, GREEDY, unseen))
        for request, reply in re.findall(r"-d '(\{.*?\})'\s*\n# -> (\{.*\})", text):
            request, reply = json.loads(request), json.loads(reply)
            for instruction, answer in zip(request["inputs"], reply["predictions"], strict=True):
                found.append((path.name, instruction, None, answer, request.get("params", {}),
                              None))
        for instruction, answer in re.findall(
                r'messages=\[\{"role": "user", "content": "([^"]+)"\}\]\)\s*\n'
                r'print\(r\.choices\[0\]\.message\.content\)\s*# -> (.+)', text):
            found.append((path.name, instruction, None, answer.strip(), {}, None))
    return found


def test_the_docs_have_examples_to_check():
    files = {example[0] for example in documented_examples()}
    assert {"README.md", "serving.md"} <= files
    assert len(documented_examples()) >= 8


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`mlflow run .` of the default profile, from a committed copy of the working tree, into a
    fresh store (the base comes from the session's base cache, pretrained here if missing)."""
    root = tmp_path_factory.mktemp("default_run")
    project = project_copy(root / "project")
    uri = f"sqlite:///{root}/mlflow.db"
    proc = mlflow_run("main", {"master_port": free_port()}, uri, timeout=2400, project=project)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return uri, proc.stdout + proc.stderr


@pytest.mark.timeout(2700)
def test_the_default_run_follows_instructions_on_words_it_never_saw(default_run):
    uri, output = default_run
    evaluate = next(r for r in runs_in(uri) if r.info.run_name == "evaluate tiny-gptj")
    m = evaluate.data.metrics
    # what the README claims of the default run, with room for another machine's arithmetic
    assert m["base/exact_match"] <= 0.05 and m["base/exact_match_unseen"] <= 0.05
    assert m["tuned/exact_match"] >= 0.9 and m["tuned/exact_match_unseen"] >= 0.85
    assert min(v for k, v in m.items() if k.startswith("tuned/exact_match_unseen/")) >= 0.7
    assert m["probe_records"] == 300 and m["eval_records"] == 300
    assert "unseen-word probe, 300 records: exact match" in output


@pytest.mark.timeout(2700)
def test_every_documented_example_is_the_champions_answer(default_run):
    from pathlib import Path

    from dolly.config import load_config
    from dolly.data import builtin_tasks
    from dolly.data.words import words_in
    from dolly.eval import probe
    from dolly.tokenizer import load_tokenizer

    uri, _ = default_run
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/dolly@champion")
        prep = next(r for r in runs_in(uri) if r.info.run_name == "data_prep tiny-gptj")
        prepared = Path(mlflow.artifacts.download_artifacts(f"runs:/{prep.info.run_id}/prepared"))
        trained = probe.trained_words(prepared, load_config("configs/tiny.yaml", {}),
                                      load_tokenizer(str(prepared / "tokenizer")))
        wrong = []
        for file, instruction, input_, answer, params, unseen in documented_examples():
            if unseen is not None:  # "never seen": no word of the request in any trained text
                words = words_in(f"{instruction} {input_ or ''}") - builtin_tasks.fixed_words()
                if unseen != ("yes" if not words & trained else "no"):
                    wrong.append(f"{file}: {instruction!r} {input_!r}: 'never seen' is "
                                 f"{unseen!r}, but {sorted(words & trained)} were trained on")
            record = {"instruction": instruction, **({"input": input_} if input_ else {})}
            got = model.predict([record], params={**GREEDY, **params})[0]
            if got != answer:
                wrong.append(f"{file}: {instruction!r} {input_!r}: documented {answer!r}, "
                             f"answered {got!r}")
        assert wrong == []
    finally:
        mlflow.set_tracking_uri(None)
