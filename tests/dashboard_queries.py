"""The PromQL of the shipped Grafana dashboard (deploy/grafana/dashboards/treespec.json): its expressions,
the metric names they read, and the expressions with Grafana's variables filled in for a real Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "treespec.json"

# PromQL words that are neither functions (always followed by "(") nor metric names.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
            "unless", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included."""
    out: list[dict] = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        out.append(panel)
        stack.extend(panel.get("panels", []))
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every template variable's query."""
    found = [(p.get("title", "?"), t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])
             if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if var.get("type") == "query" and query:
            found.append((f"variable {var['name']}", query))
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (Grafana's label_values(metric, label) included)."""
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)           # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)          # range / subquery windows
    expr = _GROUPING.sub(" ", expr)                 # grouping label lists
    expr = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r" \1 ", expr)
    expr = re.sub(r"\boffset\s+\S+", " ", expr)
    names = set()
    for name in _IDENT.findall(expr):
        if name.lower() not in KEYWORDS and not re.fullmatch(r"\d+(e\d+)?", name):
            names.add(name)
    return names


def for_prometheus(expr: str, rate_interval: str = "30s", range_: str = "5m") -> str:
    """``expr`` with Grafana's variables replaced as Grafana would (all instances selected)."""
    expr = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)
    return (expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
            .replace("$instance", ".*"))
