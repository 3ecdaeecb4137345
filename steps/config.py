"""config entry point: print every config key (type, default, choices, the steps that read it,
help), or with `-P key=<name>` one key; `-P config=<profile>` shows that profile's values.
`-P format=markdown` prints the table of keys in docs/configuration.md instead."""
from __future__ import annotations

import textwrap

from dolly import cli
from dolly.config_docs import describe, markdown_table
from dolly.errors import ConfigError


def main(argv: list[str]) -> None:
    args = cli.parse_args(argv, {"key": "", "format": "text"})
    if args.inputs["format"] not in ("text", "markdown"):
        raise ConfigError(f"format: {args.inputs['format']!r} is not one of text, markdown")
    if args.inputs["format"] == "markdown":
        print(markdown_table())
        return
    values = args.cfg.to_strings()
    rows = [r for r in describe() if not args.inputs["key"] or r["key"] == args.inputs["key"]]
    if not rows:
        raise cli.unknown_key(args.inputs["key"])
    print(f"{len(rows)} config key(s); profile {args.profile}; set one with -P <key>=<value>")
    for r in rows:
        value = values[r["key"]]
        text = (lambda v: repr(v)) if r["type"] == "str" else (lambda v: v)  # quotes: text only
        shown = text(value) + ("" if value == r["default"] else f" (default {text(r['default'])})")
        print(f"\n{r['key']} ({r['type']}) = {shown}")
        if r["choices"]:
            print(f"  choices: {r['choices']}")
        print(f"  read by: {r['steps']}" + ("; part of the checkpoint fingerprint"
                                            if r["checkpoint"] else ""))
        print(textwrap.fill(r["help"], width=96, initial_indent="  ", subsequent_indent="  "))


if __name__ == "__main__":
    cli.run(main, keep_run=False)  # looking something up leaves no run
