"""The operator-facing lists stay true: every metric the dashboard plots is documented, and back."""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dashboard_and_metrics_doc_name_the_same_metrics():
    documented = set(re.findall(r"`(synproxy_[a-z_]+)`", (REPO / "docs" / "metrics.md").read_text()))
    dashboard = json.loads((REPO / "deploy" / "grafana" / "synproxy-dashboard.json").read_text())
    plotted = {re.sub(r"_(bucket|count|sum)$", "", name) for panel in dashboard["panels"]
               for target in panel["targets"] for name in re.findall(r"synproxy_[a-z_]+", target["expr"])}
    assert plotted <= documented
    assert documented <= plotted
