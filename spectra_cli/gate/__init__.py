"""``spectra check``'s gate: policy file → rules → verdicts → JUnit XML / Markdown / annotations.

Depends on nothing above it (no typer, no rich): the CLI command renders what this package returns.
"""

from spectra_cli.gate.policy import Policy, find_policy, load_policy
from spectra_cli.gate.rules import PARAMETERS, RULES, Facts, Verdict

__all__ = ["PARAMETERS", "RULES", "Facts", "Policy", "Verdict", "find_policy", "load_policy"]
