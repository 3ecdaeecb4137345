"""Batch scoring reads its input files with data_prep's readers (dolly.data.readers), in Spark."""
import codecs
import json

import pytest

from dolly import scoring
from dolly.spark_session import spark_session

pytestmark = pytest.mark.timeout(300)


def test_read_input_decodes_like_data_prep(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # a UTF-8 BOM, NaN for a missing value, and a Windows-1252 byte (a row of nulls, no U+FFFD)
    (folder / "a.jsonl").write_bytes(
        codecs.BOM_UTF8 + b'{"id": 1, "instruction": "Hi"}\n{"id": 2, "instruction": NaN}\n'
        b'{"id": 3, "instruction": "Tr\xe8s bien"}\n')
    # an indented JSON array under a .jsonl name, with a column the others lack
    (folder / "b.jsonl").write_text(json.dumps([{"id": 4, "instruction": "Go.", "note": "n"}], indent=2))
    # UTF-16 CSV with a BOM, a quoted field across lines
    (folder / "c.csv").write_text('id,instruction\r\n5,"two\r\nlines"\r\n', encoding="utf-16")
    (folder / "_scored_by.json").write_text("{}")  # an earlier output's sidecar: skipped
    assert [f.name for f in scoring.input_files(folder)] == ["a.jsonl", "b.jsonl", "c.csv"]
    spark = spark_session("local[1]", app="dolly-test-input")
    try:
        rows = [r.asDict() for r in scoring.read_input(spark, folder).collect()]
    finally:
        spark.stop()
    assert [(r["instruction"], r["note"]) for r in rows] == [
        ("Hi", None), (None, None), (None, None), ("Go.", "n"), ("two\r\nlines", None)]
    assert [r["id"] for r in rows] == [1, 2, None, 4, 5]  # the CSV's text "5" unioned as a long
