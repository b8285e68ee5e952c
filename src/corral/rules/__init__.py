"""Detection rules: the condition language, the fields events expose, and rule files.

    registry = FieldRegistry(context, ancestors=monitor.ancestors)
    ruleset = load_default_rules(registry, extra=[Path("my-rules.yaml")])
    for rule in ruleset.match(event):
        print(rule.severity, rule.name, rule.format_output(event))

docs/rules.md is the contract: file format, condition language, field names.
"""

from corral.rules.fields import Context, ExampleResolver, FieldRegistry, NullContext
from corral.rules.language import RuleSyntaxError, compile_condition, parse
from corral.rules.loader import (
    Problem,
    Rule,
    RuleLoadError,
    RuleSet,
    default_rule_paths,
    load_default_rules,
    load_rules,
)

__all__ = [
    "Context", "ExampleResolver", "FieldRegistry", "NullContext", "Problem", "Rule", "RuleLoadError", "RuleSet",
    "RuleSyntaxError", "compile_condition", "default_rule_paths", "load_default_rules", "load_rules", "parse",
]
