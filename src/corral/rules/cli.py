"""``corral rules``: check rule files, list what is loaded, run the rules' examples.

The main CLI wires these in with ``add_rules_parser(subparsers)``; each subcommand's
function takes the parsed arguments and returns the exit status.  Files given on the
command line load after the default search path (built-in rules, /etc/corral/rules.d),
because a site's file usually builds on the defaults (appends to their lists, disables
one of them); ``--no-defaults`` looks at the given files alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from corral.rules.loader import (
    Rule,
    RuleLoadError,
    RuleSet,
    compile_for_examples,
    default_rule_paths,
    example_values,
    load_rules,
)

WIDTH = 100


def add_rules_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``rules check|list|test`` to the main command's subparsers."""
    rules = subparsers.add_parser(
        "rules", help="check, list and test detection rules",
        description="Detection rules are YAML files (docs/rules.md). They load in order: built-in rules, "
                    "then /etc/corral/rules.d/*.yaml, then the files given here; later files override "
                    "earlier ones.",
        epilog="examples:\n  corral rules check my-rules.yaml\n  corral rules list --json\n"
               "  corral rules test my-rules.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = rules.add_subparsers(dest="rules_cmd", metavar="SUBCOMMAND", required=True)

    def paths(p: argparse.ArgumentParser) -> None:
        p.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                       help="rule files or directories of them, loaded after the defaults")
        p.add_argument("--no-defaults", action="store_true",
                       help="load only the given files, not the built-in and /etc/corral/rules.d rules")

    check = sub.add_parser("check", help="validate rule files: every problem with its file and line",
                           description="Load the rules and report every problem (exit 2), or how many "
                                       "rules, lists and macros loaded (exit 0).")
    paths(check)
    check.set_defaults(func=cmd_rules_check)

    listing = sub.add_parser("list", help="what rules are loaded, and from where",
                             description="One line per rule, under the file that defines it: name, event "
                                         "kinds, severity, category, action, whether enabled, and its line.")
    paths(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per rule")
    listing.set_defaults(func=cmd_rules_list)

    test = sub.add_parser("test", help="run every rule's examples through its condition",
                          description="Each `match` example must match its rule (condition true, no "
                                      "exception) and each `no_match` example must not. Exit 1 on any failure.")
    paths(test)
    test.add_argument("-v", "--verbose", action="store_true", help="also show every passing example")
    test.set_defaults(func=cmd_rules_test)
    return rules


def _load(args: argparse.Namespace, out: TextIO) -> RuleSet | None:
    """The rules, or None after printing every problem."""
    paths = [*([] if args.no_defaults else default_rule_paths()), *args.paths]
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        for p in missing:
            print(f"{p}: no such file or directory", file=out)
        return None
    try:
        return load_rules(paths)
    except RuleLoadError as e:
        for problem in e.problems:
            print(problem, file=out)
        n = len(e.problems)
        print(f"{n} problem{'s' if n != 1 else ''}", file=out)
        return None


def cmd_rules_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    ruleset = _load(args, out)
    if ruleset is None:
        return 2
    print(f"ok: {len(ruleset.rules)} rules, {len(ruleset.lists)} lists, {len(ruleset.macros)} macros "
          f"({len(ruleset.files)} file{'s' if len(ruleset.files) != 1 else ''})", file=out)
    return 0


def _fit(text: str, width: int, left: bool = False) -> str:
    """Text cut to width with an ellipsis (on the left for paths, whose end matters)."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1:] if left else text[:width - 1] + "…"


# Rows are grouped under their file, so a row needs only the line: the name gets the room.
_COLUMNS = (("NAME", 34), ("EVENTS", 13), ("SEVERITY", 8), ("CATEGORY", 20), ("ACTION", 11), ("ON", 3),
            ("LINE", 5))
assert sum(w for _, w in _COLUMNS) + len(_COLUMNS) - 1 == WIDTH


def _row(rule: Rule) -> str:
    cells = (rule.name, ",".join(rule.events), rule.severity, rule.category, rule.action,
             "yes" if rule.enabled else "no", str(rule.line))
    return " ".join(_fit(c, w).ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=True))


def cmd_rules_list(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    ruleset = _load(args, out)
    if ruleset is None:
        return 2
    if args.json:
        for rule in ruleset.rules:
            print(json.dumps({"name": rule.name, "events": list(rule.events), "severity": rule.severity,
                              "category": rule.category, "action": rule.action, "enabled": rule.enabled,
                              "tags": list(rule.tags), "source": rule.source, "desc": rule.desc}), file=out)
        return 0
    print(" ".join(h.ljust(w) for h, w in _COLUMNS).rstrip(), file=out)
    current = None
    for rule in ruleset.rules:
        if rule.file != current:
            current = rule.file
            print(_fit(f"{rule.file}:", WIDTH, left=True), file=out)
        print(_row(rule).rstrip(), file=out)
    print(f"{len(ruleset.rules)} rules from {len(ruleset.files)} files", file=out)
    return 0


def cmd_rules_test(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    ruleset = _load(args, out)
    if ruleset is None:
        return 2
    tests = compile_for_examples(ruleset)
    passed = failed = 0
    for rule in ruleset.rules:
        test = tests[rule.name]
        for example in rule.examples:
            values = example_values(rule, example)
            got = bool(test(values))
            shown = json.dumps(example.values, default=str)
            where = f"{rule.file}:{example.line}: rule {rule.name!r}"
            if got == example.expect:
                passed += 1
                if args.verbose:
                    print(f"ok   {where}: {'match' if got else 'no_match'} {shown}", file=out)
            else:
                failed += 1
                wanted = "should match but does not" if example.expect else "should not match but does"
                print(f"FAIL {where}: {wanted}: {shown}", file=out)
    print(f"{passed} passed, {failed} failed", file=out)
    return 1 if failed else 0
