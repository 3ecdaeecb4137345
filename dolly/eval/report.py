"""What the evaluate run shows in the MLflow UI: base and tuned answers side by side, by family.

The evaluate run's description (the `mlflow.note.content` tag; the MLflow UI renders it as
Markdown on the run page's Overview, its first lines at once and the rest after 'Show more')
holds a short comparison: first the exact match of base and tuned, overall and per task family,
in one paragraph (visible without a click), then per family its first few evaluated records with
the reference, the base answer and the tuned answer. Every record with its scores is in the two
nested evaluation runs of dolly.eval.genai (the MLflow UI's Evaluation runs page). The same
Markdown is logged as the artifact `comparison.md` (the Artifacts tab renders .md files).

Answers are model output and inputs are user data: every cell goes through `md_cell`, which
turns Markdown and HTML syntax into character references, so a `|`, a backtick, a newline or a
`<script>` in an answer shows as text and never breaks the table or the page.
"""
from __future__ import annotations

import pandas as pd

from dolly.config import TINY_BASES, TINY_LLAMA

# MLflow caps a tag value at 8,000 characters (mlflow.utils.validation.MAX_TAG_VAL_LENGTH).
NOTE_LIMIT = 7500
PER_FAMILY = 3
CELL_WIDTH = 60
MAX_FAMILIES = 12
FAMILY_WIDTH = 40
NO_FAMILY = "(no category)"

# Characters that mean something inside a table cell to Markdown (GitHub-flavoured, as the UI's
# showdown renders it: cell separators, emphasis, strikethrough, code, links and images, URL
# autolinks, @mentions, :emoji:, backslash escapes) or to HTML (tags, entities). Each becomes a
# numeric character reference, which the browser shows as the character itself. Block syntax
# (`#`, `-`, `>`...) needs a line start, and a cell never starts a line.
_SPECIAL = set("&<>|`*_~[]\\@:")


def md_cell(value, width: int = CELL_WIDTH) -> str:
    """`value` as the text of one Markdown table cell, shown literally.

    None/NaN and empty text give `*(empty)*`. Line breaks become ` ↵ `, other control
    characters a space; text longer than `width` characters is cut to `width - 1` and ends with
    `…` (cut before escaping, so no character reference is cut in half); then every character of
    `_SPECIAL` becomes `&#<code point>;`. Example: 'a|b' -> 'a&#124;b'.
    """
    if value is None or (isinstance(value, float) and value != value):
        return "*(empty)*"
    text = str(value).replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        return "*(empty)*"
    text = " ↵ ".join(text.split("\n"))
    text = "".join(" " if (ord(c) < 32 or 0x7F <= ord(c) < 0xA0) else c for c in text)
    if len(text) > width:
        text = text[:max(width - 1, 0)].rstrip() + "…"
    return "".join(f"&#{ord(c)};" if c in _SPECIAL else c for c in text)


def base_description(base_model: str) -> str:
    """What the base model is, in one phrase (README and model card use the same words)."""
    if base_model.strip() in TINY_BASES:
        arch = "Llama" if base_model.strip() == TINY_LLAMA else "GPT-J"
        return (f"a tiny {arch} pretrained offline on a built-in corpus of running text "
                "(no instruction format)")
    low = base_model.lower()
    if "gpt-j" in low or "gptj" in low:
        return (f"{base_model}, EleutherAI's GPT-J 6B, pretrained on the Pile "
                "(no instruction tuning)")
    return f"{base_model} (as loaded from the Hugging Face Hub or its folder)"


def what_it_shows(base_model: str) -> str:
    """One sentence on what base vs tuned therefore shows: Dolly's effect for a base known to be
    a pretrained language model without instruction tuning (the tiny default, GPT-J), else only
    what the fine-tune adds to that base."""
    low = base_model.strip().lower()
    if base_model.strip() in TINY_BASES or "gpt-j" in low or "gptj" in low:
        return (f"The base is {base_description(base_model)}. Base vs tuned therefore shows what "
                "Dolly showed: a short instruction fine-tune teaches a pretrained language model "
                "to follow instructions; the base continues the prompt as text and does not "
                "answer instructions in the trained prompt format.")
    return (f"The base is {base_description(base_model)}. Base vs tuned shows what this "
            "instruction fine-tune adds to that base.")


def families(table: pd.DataFrame) -> list[str]:
    """The family of each row of `table` (its `category`; NO_FAMILY when missing or empty)."""
    if "category" not in table.columns:
        return [NO_FAMILY] * len(table)
    return [c if isinstance(c, str) and c.strip() else NO_FAMILY for c in table["category"]]


def pick_examples(table: pd.DataFrame, per_family: int = PER_FAMILY) -> dict[str, pd.DataFrame]:
    """{family: its first `per_family` rows of `table`, in table order}, families sorted by name.

    `table` is evaluate's per-example table in the order the records were evaluated (a fixed
    prefix of the test split), so the same evaluation set always shows the same rows."""
    fams = pd.Series(families(table), index=table.index)
    return {f: table[fams == f].head(per_family) for f in sorted(set(fams))}


def _score(v: float) -> str:
    return f"{v:.2f}"


def _mark(hit) -> str:
    return " ✓" if float(hit) == 1.0 else " ✗"


def _table_row(r, width: int) -> str:
    """One record as a row of the comparison's tables: instruction, input, reference, base and
    tuned answer, each answer marked ✓ / ✗ by its exact match."""
    return (f"| {md_cell(r['instruction'], width)} | {md_cell(r['input'], width)} | "
            f"{md_cell(r['reference'], width)} | "
            f"{md_cell(r['base_response'], width)}{_mark(r['base_exact_match'])} | "
            f"{md_cell(r['tuned_response'], width)}{_mark(r['tuned_exact_match'])} |")


def comparison_markdown(table: pd.DataFrame, base_model: str, *, per_family: int = PER_FAMILY,
                        width: int = CELL_WIDTH, max_families: int = MAX_FAMILIES,
                        unseen: pd.DataFrame | None = None,
                        checked: str = "the fine-tuning, pretraining and tokenizer texts") -> str:
    """The comparison as Markdown.

    The first paragraph holds every figure (exact match base -> tuned, overall and per family),
    because the MLflow UI shows only the first lines of a run description until 'Show more' is
    clicked; then what the base is, then per family its first `per_family` records as a table.
    `table` needs the columns instruction, input, reference, base_response, tuned_response,
    base_exact_match, tuned_exact_match (0/1 floats) and optionally category; one row per
    evaluated record. Per-family exact match is the mean over all of a family's rows.
    `unseen`, the same kind of table for the unseen-word probe (dolly.eval.probe), adds its
    figures as the second paragraph and, with `per_family` > 0, its first record per family;
    `checked` says which texts its words were checked against."""
    fams = pd.Series(families(table), index=table.index)
    names = sorted(set(fams))
    shown = names[:max_families]

    def scores(rows: pd.DataFrame) -> str:
        return (f"{_score(rows['base_exact_match'].mean())} → "
                f"{_score(rows['tuned_exact_match'].mean())}")

    figures = [f"**all {scores(table)}**" if len(table) else "**no records**"]
    figures += [f"{md_cell(f, FAMILY_WIDTH)} {scores(table[fams == f])}" for f in shown]
    if len(names) > len(shown):
        figures.append(f"{len(names) - len(shown)} more families in the metrics "
                       "base/exact&#95;match/&#60;family&#62;")
    lines = [f"**Exact match, base → tuned**, {len(table)} held-out records: "
             + " · ".join(figures), "",
             f"{what_it_shows(base_model)} Greedy decoding; exact match ignores case, spacing "
             "and trailing punctuation; ✓ / ✗: exact match. Every evaluated record is in the "
             "artifact `eval_examples.json`, and with its scores in this run's two nested "
             "evaluation runs, base and tuned (Evaluation runs page: tick both, then "
             "Compare)."]
    if unseen is not None:
        ufams = pd.Series(families(unseen), index=unseen.index)
        ufigures = [f"**all {scores(unseen)}**" if len(unseen) else "**no records**"]
        ufigures += [f"{md_cell(f, FAMILY_WIDTH)} {scores(unseen[ufams == f])}"
                     for f in sorted(set(ufams))[:max_families]]
        lines[1:1] = ["", f"**Unseen words, base → tuned**, {len(unseen)} probe records whose "
                          f"words occur nowhere in {md_cell(checked, 200)}: "
                          + " · ".join(ufigures)]
        if per_family > 0:
            lines += ["", "**Unseen words** (the first record of each family; all in the "
                          "artifact `probe_examples.json`)", "",
                      "| instruction | input | reference | base answer | tuned answer |",
                      "|---|---|---|---|---|"]
            for rows in pick_examples(unseen, 1).values():
                lines += [_table_row(r, width) for _, r in rows.iterrows()]
    if per_family > 0:
        picked = pick_examples(table, per_family)
        for f in shown:
            rows, every = picked[f], table[fams == f]
            # bold, not a heading: the UI's description styles no heading
            lines += ["", f"**{md_cell(f, FAMILY_WIDTH)}: {scores(every)}** (the first "
                          f"{len(rows)} of {len(every)} records)", "",
                      "| instruction | input | reference | base answer | tuned answer |",
                      "|---|---|---|---|---|"]
            lines += [_table_row(r, width) for _, r in rows.iterrows()]
    return "\n".join(lines)


def run_description(table: pd.DataFrame, base_model: str, limit: int = NOTE_LIMIT,
                    unseen: pd.DataFrame | None = None,
                    checked: str = "the fine-tuning, pretraining and tokenizer texts") -> str:
    """`comparison_markdown` within `limit` characters (a run description is a tag): fewer
    rows per family and narrower cells until it fits, at worst only the figures."""
    text = ""
    for per_family, width in ((PER_FAMILY, CELL_WIDTH), (PER_FAMILY, 40), (2, 30), (1, 24),
                              (0, 24)):
        text = comparison_markdown(table, base_model, per_family=per_family, width=width,
                                   unseen=unseen, checked=checked)
        if len(text) <= limit:
            return text
    return text[:limit - 1] + "…"


def by_family(metrics: dict[str, float], who: str, metric: str = "exact_match") -> dict[str, float]:
    """{family: value} from the metrics `<who>/<metric>/<family>` that evaluate logs, in family
    name order; {} when there are none."""
    prefix = f"{who}/{metric}/"
    return dict(sorted((k[len(prefix):], v) for k, v in metrics.items() if k.startswith(prefix)))


def family_line(metrics: dict[str, float], who: str, metric: str = "exact_match") -> str:
    """'<who> exact match by family: count_digit 1.00, first 0.93' from the metrics
    `<who>/<metric>/<family>` (in name order); '' when there are none."""
    found = by_family(metrics, who, metric)
    if not found:
        return ""
    return (f"{who} {metric.replace('_', ' ')} by family: "
            + ", ".join(f"{f} {_score(v)}" for f, v in found.items()))
