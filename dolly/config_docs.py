"""The config keys as documentation: `mlflow run . -e config` and the table in
docs/configuration.md."""
from __future__ import annotations

from dolly.config import FIELDS, field_type, to_text


def describe() -> list[dict[str, str]]:
    """One row per field, in declaration order: key, type, default, choices, the steps that
    read it, whether it shapes a checkpoint, and its help text."""
    rows = []
    for name, f in FIELDS.items():
        m = f.metadata
        rows.append({"key": name, "type": field_type(name), "default": to_text(f.default),
                     "choices": ", ".join(m.get("choices", ())),
                     "steps": ", ".join(dict.fromkeys((*m["steps"], *m.get("read_by", ()))))
                     or "-",
                     "checkpoint": "yes" if m["checkpoint"] else "", "help": m["help"]})
    return rows


def markdown_table() -> str:
    """docs/configuration.md's table of config keys (a test keeps that file equal to this)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| key | type | default | read by | meaning |", "|---|---|---|---|---|"]
    for r in describe():
        choices = f" One of: {r['choices']}." if r["choices"] else ""
        shapes = " Part of the checkpoint fingerprint." if r["checkpoint"] else ""
        default = f"`{r['default']}`" if r["default"] != "" else "''"
        lines.append(f"| `{r['key']}` | {r['type']} | {cell(default)} | {r['steps']} | "
                     f"{cell(r['help'] + choices + shapes)} |")
    return "\n".join(lines)
