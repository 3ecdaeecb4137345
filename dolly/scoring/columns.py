"""Column names as Spark compares them. With `spark.sql.caseSensitive=false` (Spark's default)
`Response` and `response` are one column to Spark: `withColumn("response", ...)` replaces a
`Response`, `col("instruction")` finds an `Instruction`, and a table with both `instruction` and
`INSTRUCTION` is ambiguous (or loses one's values silently: Spark's JSON reader merges keys that
differ only in case). batch_score compares names with these functions, never with `==` / `in`,
so its own checks see what Spark will do; in a case-sensitive session they compare exactly.
"""
from __future__ import annotations

from collections.abc import Iterable

from dolly.errors import DataError

CONF = "spark.sql.caseSensitive"


def case_sensitive(spark) -> bool:
    """Whether `spark` (a SparkSession) resolves column names case-sensitively."""
    return str(spark.conf.get(CONF, "false")).strip().lower() == "true"


def _fold_char(c: str) -> str:
    # Java's String.equalsIgnoreCase (Spark's resolver) compares char by char, through
    # Character.toUpperCase then toLowerCase, which never turn one char into several: Python's
    # mappings, used only where they map one char to one (close to Java's, not identical).
    up = c.upper()
    up = up if len(up) == 1 else c
    low = up.lower()
    return low if len(low) == 1 else up


def key(name: str, case_sensitive: bool = False) -> str:
    """What Spark compares of a column name: the name itself, or its case-folded form."""
    return name if case_sensitive else "".join(map(_fold_char, name))


def find(names: Iterable[str], wanted: str, case_sensitive: bool = False) -> str | None:
    """The column of `names` that Spark would resolve `wanted` to (as it is spelled there), or
    None. Assumes `names` has no clash (see `clash`)."""
    k = key(wanted, case_sensitive)
    return next((n for n in names if key(n, case_sensitive) == k), None)


def clash(names: Iterable[str], case_sensitive: bool = False) -> tuple[str, str] | None:
    """The first two of `names` that are one column to Spark (`instruction`, `INSTRUCTION`)."""
    seen: dict[str, str] = {}
    for n in names:
        first = seen.setdefault(key(n, case_sensitive), n)
        if first != n:
            return first, n
    return None


def refuse_clash(names: Iterable[str], case_sensitive: bool, where: str) -> None:
    """Raise DataError (one line) when two of `names` differ only in case in a case-insensitive
    session: Spark would call either ambiguous, or merge them and lose one's values."""
    if not case_sensitive and (pair := clash(names)):
        raise DataError(f"{where} has columns '{pair[0]}' and '{pair[1]}', which differ only in "
                        f"case: Spark ({CONF}=false) takes them for one column; rename one of "
                        "them")


def fresh(base: str, names: Iterable[str]) -> str:
    """`base`, or `base_2`, `base_3`, ...: a name no column of `names` has in any case (for the
    step's own helper columns, which are dropped by name at the end)."""
    taken = {key(n) for n in names}
    name, i = base, 1
    while key(name) in taken:
        i += 1
        name = f"{base}_{i}"
    return name
