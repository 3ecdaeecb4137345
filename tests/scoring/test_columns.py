"""dolly.scoring.columns: column names compared as Spark compares them (issue 23, case 8)."""
import pytest

from dolly.errors import DataError
from dolly.scoring import columns


def test_names_that_differ_only_in_case_are_one_column_unless_case_sensitive():
    assert columns.key("Instruction") == columns.key("INSTRUCTION") == "instruction"
    assert columns.key("Instruction", case_sensitive=True) == "Instruction"
    # Java's equalsIgnoreCase compares char by char: ß is not SS to Spark
    assert columns.key("STRASSE") != columns.key("straße")
    assert columns.find(["Instruction", "Context", "Response"], "context") == "Context"
    assert columns.find(["Instruction", "Context"], "context", case_sensitive=True) is None
    assert columns.find(["Instruction"], "input") is None


def test_a_clash_names_the_first_two_columns_spark_takes_for_one():
    names = ["id", "instruction", "Context", "INSTRUCTION", "context"]
    assert columns.clash(names) == ("instruction", "INSTRUCTION")
    assert columns.clash(names, case_sensitive=True) is None
    assert columns.clash(["Instruction", "Context", "Response"]) is None
    with pytest.raises(DataError) as e:
        columns.refuse_clash(names, False, "in.csv")
    assert str(e.value) == ("in.csv has columns 'instruction' and 'INSTRUCTION', which differ only "
                            "in case: Spark (spark.sql.caseSensitive=false) takes them for one "
                            "column; rename one of them")
    columns.refuse_clash(names, True, "in.csv")  # a case-sensitive session tells them apart


def test_the_steps_helper_columns_never_take_a_users_name():
    assert columns.fresh("__dolly_row", ["id", "instruction"]) == "__dolly_row"
    assert columns.fresh("__dolly_row", ["__DOLLY_ROW", "__dolly_row_2"]) == "__dolly_row_3"


def test_case_sensitivity_is_the_sessions():
    class Conf(dict):
        def get(self, k, default=None):
            return super().get(k, default)

    class Session:
        def __init__(self, **conf):
            self.conf = Conf(conf)

    assert columns.case_sensitive(Session()) is False
    assert columns.case_sensitive(Session(**{"spark.sql.caseSensitive": "false"})) is False
    assert columns.case_sensitive(Session(**{"spark.sql.caseSensitive": "TRUE"})) is True
