"""The operator-facing lists stay true: every metric the dashboard plots is documented, and back; every
configuration key is in docs/configuration.md's table, and back."""

import json
import re
from pathlib import Path

from synproxy.config import SCHEMA
from synproxy.front.handler import FrontPolicy

REPO = Path(__file__).resolve().parents[1]


def test_dashboard_and_metrics_doc_name_the_same_metrics():
    documented = set(re.findall(r"`(synproxy_[a-z_]+)`", (REPO / "docs" / "metrics.md").read_text()))
    dashboard = json.loads((REPO / "deploy" / "grafana" / "synproxy-dashboard.json").read_text())
    plotted = {re.sub(r"_(bucket|count|sum)$", "", name) for panel in dashboard["panels"]
               for target in panel["targets"] for name in re.findall(r"synproxy_[a-z_]+", target["expr"])}
    assert plotted <= documented
    assert documented <= plotted


def _keys(schema: dict, prefix: str = "") -> set[str]:
    """Every key a configuration file may hold, dotted: a section's own keys and, for a list of mappings
    (`backends`), its items' keys."""
    keys = set()
    for name, field_ in schema.items():
        nested = field_.check if isinstance(field_.check, dict) else field_.entry
        if nested is None:
            keys.add(prefix + name)
        else:
            keys |= _keys(nested, f"{prefix}{name}.") | ({prefix + name} if field_.entry else set())
    return keys


def test_every_configuration_key_is_documented_and_every_documented_key_exists():
    """Before: `farm_mtu` was read but not in the table an operator looks keys up in."""
    table = set(re.findall(r"^\| `([a-z_.]+)` \|", (REPO / "docs" / "configuration.md").read_text(), re.MULTILINE))
    items = {"backends.address", "backends.weight", "backends.drain", "backends.down"}  # described in `backends`
    assert table == _keys(SCHEMA) - items


def test_the_examples_mss_comment_says_what_the_fronts_announce():
    """Before: deploy/example.yaml said the fronts announce backend_mss minus 32; they announce 48 less."""
    text = (REPO / "deploy" / "example.yaml").read_text()
    mss, ipv4, ipv6 = map(int, re.search(r"^backend_mss: (\d+) .* minus (\d+) \(encapsulation; (\d+) to IPv6\)",
                                         text, re.MULTILINE).groups())
    policy = FrontPolicy(vips=frozenset(), ports=frozenset(), farm_address=bytes(4), backends=(bytes(4),),
                         encap_port=6080, encap_key=bytes(16), flow_key=bytes(16), backend_mss=mss)
    assert (policy.announced_mss(4), policy.announced_mss(6)) == (mss - ipv4, mss - ipv6)
