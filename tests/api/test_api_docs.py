"""The metrics catalog (docs/metrics.md), the sample alert rules and the README's API table
stay in step with the code."""

from __future__ import annotations

import re

import yaml

from mailingest.api.app import ROUTES
from mailingest.metrics import NAMES
from support import ROOT


def test_the_catalog_lists_every_metric_once() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text()
    listed = re.findall(r"^\| `(mailingest_\w+)` \|", text, flags=re.MULTILINE)
    assert sorted(listed) == sorted(NAMES)


def test_the_sample_alert_rules_use_known_metrics() -> None:
    rules = yaml.safe_load((ROOT / "config" / "prometheus-alerts.yml").read_text())
    [group] = rules["groups"]
    assert group["rules"]
    families = {re.sub(r"_total$", "", n) for n in NAMES}
    for rule in group["rules"]:
        assert rule["alert"].startswith("Mailingest") and rule["expr"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        for used in re.findall(r"mailingest_\w+", rule["expr"]):
            base = re.sub(r"_(total|bucket|count|sum)$", "", used)
            assert base in families, (rule["alert"], used)


def test_the_readme_documents_every_route() -> None:
    text = (ROOT / "README.md").read_text()
    for method, path, _, _ in ROUTES:
        shown = path.replace("{id:[0-9]{1,19}}", "{id}")
        assert f"`{method} {shown}`" in text, (method, shown)
