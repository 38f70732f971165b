"""JUnit XML for CI systems (GitHub/GitLab/Jenkins test reports): one ``<testsuite>`` per rule, one
``<testcase>`` per rule × module (``classname="spectra.<rule>"``, ``name=<module>``), a ``<failure>`` for a
broken rule and ``<skipped>`` where a rule could not apply. Written atomically (temporary name, rename)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from spectra_cli.gate.rules import Verdict
from spectra_cli.report.render import write_text


def junit_tree(verdicts: Sequence[Verdict], name: str, seconds: float = 0.0, policy: str = "") -> ET.Element:
    """``<testsuites name tests failures errors skipped time>`` with one ``<testsuite>`` per rule (in verdict
    order) holding its testcases. The time of the run is given to the root and shared evenly by the suites."""
    rules: dict[str, list[Verdict]] = {}
    for v in verdicts:
        rules.setdefault(v.rule, []).append(v)

    def counts(vs: Sequence[Verdict]) -> dict[str, str]:
        return {
            "tests": str(len(vs)),
            "failures": str(sum(1 for v in vs if v.status == "fail")),
            "errors": "0",
            "skipped": str(sum(1 for v in vs if v.status == "skip")),
        }

    root = ET.Element("testsuites", {"name": name, **counts(verdicts), "time": f"{seconds:.3f}"})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    per = seconds / max(len(rules), 1)
    for rule, vs in rules.items():
        suite = ET.SubElement(root, "testsuite", {"name": rule, **counts(vs), "time": f"{per:.3f}",
                                                  "timestamp": stamp})  # fmt: skip
        if policy:
            props = ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", {"name": "policy", "value": policy})
            line = next((v.line for v in vs if v.line), None)
            if line:
                ET.SubElement(props, "property", {"name": "policy_line", "value": str(line)})
        for v in vs:
            case = ET.SubElement(
                suite, "testcase", {"classname": f"spectra.{rule}", "name": v.module, "time": "0"}
            )
            limit = list(v.limit) if isinstance(v.limit, tuple) else v.limit
            if v.status == "fail":
                fail = ET.SubElement(case, "failure", {"message": v.message, "type": rule})
                fail.text = f"{rule} = {limit} failed for {v.module}: {v.message}" + (
                    f"\npolicy line {v.line}" if v.line else ""
                )
            elif v.status == "skip":
                ET.SubElement(case, "skipped", {"message": v.message})
    return root


def write_junit(
    path: Path, verdicts: Sequence[Verdict], name: str, seconds: float = 0.0, policy: str = ""
) -> None:
    """Write :func:`junit_tree` to ``path`` (UTF-8, XML declaration) atomically."""
    root = junit_tree(verdicts, name, seconds, policy)
    ET.indent(root)
    write_text(path, ET.tostring(root, encoding="utf-8", xml_declaration=True).decode("utf-8"))


__all__ = ["junit_tree", "write_junit"]
