"""dolly.scoring.output: which folders batch_score may write, and what it may replace."""
import json

import pytest

from dolly.errors import ConfigError, DollyError
from dolly.scoring.output import MARKER, OutputFolder, check_output, publish


def test_a_new_or_empty_folder_is_fine(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    assert check_output(tmp_path / "new" / "out", src) == OutputFolder(tmp_path / "new" / "out", [])
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", src).replace == []


def test_a_non_empty_folder_is_refused_without_touching_it(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    out = tmp_path / "d"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    with pytest.raises(DollyError, match=r"output folder .*d is not empty \(1 files, e.g. "
                                         r"README.txt\): batch_score writes only into a new"):
        check_output(out, src)
    with pytest.raises(DollyError, match="was not written by batch_score"):
        check_output(out, src, "overwrite")
    assert (out / "README.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["input_in_output", "same", "output_in_input"])
def test_an_output_that_holds_or_is_the_input_is_refused(tmp_path, where):
    d2 = tmp_path / "d2"
    d2.mkdir()
    src = d2 / "input.jsonl"
    src.write_text("{}\n")
    output, input, word = {"input_in_output": (d2, src, "holds"), "same": (d2, d2, "is"),
                           "output_in_input": (d2 / "scored", d2, "is inside")}[where]
    with pytest.raises(DollyError, match=f"output .* {word} the input"):
        check_output(output, input, "overwrite")
    assert src.read_text() == "{}\n"


def test_overwrite_replaces_only_what_batch_score_wrote(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("part-0.parquet", "_SUCCESS", "_scored_by.json"):
        (out / name).write_text("old")
    (out / MARKER).write_text(json.dumps({"files": ["part-0.parquet", "_SUCCESS",
                                                    "_scored_by.json"]}))
    folder = check_output(out, src, "overwrite")
    assert folder.replace == ["_SUCCESS", "_scored_by.json", "part-0.parquet"]
    staging = tmp_path / ".out.staging"
    staging.mkdir()
    (staging / "part-1.parquet").write_text("new")
    (staging / "_SUCCESS").write_text("")
    assert publish(staging, folder) == ["_SUCCESS", "part-1.parquet"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "_SUCCESS", "part-1.parquet"])
    assert not staging.exists()
    # a file someone added since: overwrite refuses, and nothing is deleted
    (out / "notes.txt").write_text("keep")
    (out / MARKER).write_text(json.dumps({"files": ["_SUCCESS", "part-1.parquet"]}))
    with pytest.raises(DollyError, match=r"holds 1 files batch_score did not write \(e.g. "
                                         r"notes.txt\)"):
        check_output(out, src, "overwrite")
    assert (out / "notes.txt").read_text() == "keep"


def test_an_unknown_mode_is_one_line(tmp_path):
    with pytest.raises(DollyError, match="mode: 'append' is not one of error, overwrite"):
        check_output(tmp_path / "o", tmp_path / "i", "append")


def test_batch_score_refuses_one_column_for_answers_and_errors(tmp_path):
    from steps import batch_score

    (tmp_path / "in.jsonl").write_text('{"instruction": "Greet Mo."}\n')
    with pytest.raises(ConfigError, match=r"^output_column and error_column are both 'error'"):
        batch_score.main(["--input", str(tmp_path / "in.jsonl"), "--output",
                          str(tmp_path / "out"), "--output_column", "error"])
    assert not (tmp_path / "out").exists()
