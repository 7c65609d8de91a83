"""The front's NFQUEUE shell around the handler: every packet gets one verdict whatever fails while it is
handled, failures are counted by reason, and a reload may change anything it can apply.

Front.on_packet is driven with stand-ins for the queue's packet and the raw socket (the unit under test
is the shell, not the kernel); the reload runs inside a namespace of its own, as it sets sysctls.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import threading
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.packet import raw

from synproxy import encap
from synproxy.config import ConfigError, load_config, write_secret
from synproxy.front import service
from synproxy.front.handler import TokenBucket
from synproxy.front.service import Front
from synproxy.netns import inside, namespaces, unique_name
from tests.test_front_handler import icmp_error

VIP4, VIP6 = "198.19.0.10", "2001:db8:ffff::10"
BACKENDS = ["198.18.20.2", "198.18.21.2"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the front opens a raw socket")
pytestmark = needs_root


class QueuedPacket:
    """What netfilterqueue hands the callback: the payload, and verdicts recorded (one allowed)."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.verdicts: list[str] = []
        self.replacement: bytes | None = None

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        self.replacement = payload

    def _verdict(self, verdict: str) -> None:
        if self.verdicts:
            raise RuntimeError("Verdict already given for this packet")
        self.verdicts.append(verdict)

    def accept(self) -> None:
        self._verdict("accept")

    def drop(self) -> None:
        self._verdict("drop")


class FailingSocket:
    def __init__(self, code: int):
        self.code = code

    def sendto(self, data: bytes, address) -> int:
        raise OSError(self.code, os.strerror(self.code))


def write_config(directory: Path, backends=BACKENDS, front_extra: str = "") -> Path:
    if not (directory / "secret.hex").exists():
        write_secret(directory / "secret.hex", b"\xab" * 32)
    config = directory / "synproxy.yaml"
    config.write_text(f"vips: [{VIP4}, {VIP6}]\nports: [80]\nsecret_file: secret.hex\n"
                      f"backends: [{', '.join(backends)}]\nfront:\n  farm_address: 198.18.10.2\n{front_extra}")
    return config


def data(family: int, size: int = 200, sport: int = 40000) -> bytes:
    layer = IP(src="198.18.1.2", dst=VIP4, flags="DF") if family == 4 else IPv6(src="2001:db8:1::2", dst=VIP6)
    headers = len(raw(layer / TCP()))
    return raw(layer / TCP(sport=sport, dport=80, flags="PA") / (b"x" * (size - headers)))


@pytest.fixture
def front(tmp_path):
    return Front(str(write_config(tmp_path)))


@pytest.mark.parametrize("code", [errno.EMSGSIZE, errno.ENETUNREACH, errno.EPERM])
def test_a_failed_send_drops_the_packet_counts_the_reason_and_logs_once(front, capsys, code):
    front.raw_ipv4 = FailingSocket(code)
    packets = [QueuedPacket(data(6)) for _ in range(5)]
    for packet in packets:
        front.on_packet(packet)
    assert [packet.verdicts for packet in packets] == [["drop"]] * 5
    outcome = f"send_failed_{errno.errorcode[code].lower()}"
    assert front.counts.packets[outcome, 6] == 5
    assert not front.counts.forwarded, "a packet that was not sent is not counted as forwarded"
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(entry["event"], entry["outcome"]) for entry in logged] == [("packet_failed", outcome)]


def test_an_exception_in_the_handler_drops_the_packet_and_the_loop_goes_on(front, monkeypatch, capsys):
    def broken(*_):
        raise KeyError("a bug")

    monkeypatch.setattr(service, "handle", broken)
    packet = QueuedPacket(data(4))
    front.on_packet(packet)
    assert packet.verdicts == ["drop"]
    assert front.counts.packets["internal_error", 4] == 1
    assert "KeyError" in json.loads(capsys.readouterr().err)["error"]


def test_too_big_answers_are_rate_limited(front):
    front.too_big_answers = TokenBucket(rate=0, burst=3)  # no refill: the burst, then nothing
    packets = [QueuedPacket(data(6, 1500)) for _ in range(5)]
    for packet in packets:
        front.on_packet(packet)
    assert [packet.verdicts for packet in packets] == [["accept"]] * 3 + [["drop"]] * 2
    assert IPv6(packets[0].replacement)[ICMPv6PacketTooBig].mtu == 1500 - encap.OVERHEAD
    assert front.counts.packets["too_big", 6] == 3
    assert front.counts.packets["too_big_rate_limited", 6] == 2


class RecordingSocket:
    def __init__(self):
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, address) -> int:
        self.sent.append((data, address))
        return len(data)


def test_icmp_errors_are_forwarded_within_their_budget(front):
    """IPv4 errors replace the queued packet; IPv6 ones leave by the raw socket, as IPv6 segments do."""
    front.icmp_errors = TokenBucket(rate=0, burst=4)  # no refill: the burst, then nothing
    front.raw_ipv4 = RecordingSocket()
    packets = [QueuedPacket(icmp_error(family)) for family in (4, 6, 4, 6, 4, 6)]
    for packet in packets:
        front.on_packet(packet)
    assert [packet.verdicts for packet in packets] == [["accept"], ["drop"]] * 2 + [["drop"]] * 2
    assert packets[0].replacement[20 + 8 + 1] == encap.FLAG_ICMP
    assert [data[20 + 8 + 1] for data, _ in front.raw_ipv4.sent] == [encap.FLAG_ICMP] * 2
    assert front.counts.packets["icmp_forwarded", 4] == front.counts.packets["icmp_forwarded", 6] == 2
    assert front.counts.packets["icmp_rate_limited", 4] == front.counts.packets["icmp_rate_limited", 6] == 1


def test_forwarded_counts_are_keyed_by_backend_address_across_a_reload(front, tmp_path):
    added = ["198.18.22.2", *reversed(BACKENDS)]
    for backends in (BACKENDS, added):
        write_config(tmp_path, backends)
        front.load()
        for sport in range(40000, 40300):
            front.on_packet(QueuedPacket(data(4, sport=sport)))
    # Where each flow went is the policy's choice; the counts must be under that backend's address.
    expected: dict[str, int] = {}
    for backends in (BACKENDS, added):
        write_config(tmp_path, backends)
        front.load()
        for sport in range(40000, 40300):
            backend = front.policy.backends[service.handle(data(4, sport=sport), 0, front.schedule,
                                                           front.policy).backend]
            address = str(ipaddress.ip_address(backend))
            expected[address] = expected.get(address, 0) + 1
    assert dict(front.counts.forwarded) == expected
    assert set(expected) == set(added)


def test_a_reload_reports_what_needs_a_restart_and_applies_the_rest(front, tmp_path, capsys):
    with namespaces(unique_name("spr")) as (namespace,), inside(namespace):
        front.running = service.restart_settings(front.config)
        front.protected = (front.config.vips, front.config.ports)
        write_config(tmp_path, ["198.18.22.2"], "  queue_num: 5\n  data_plane: tc\n")
        front.reload()
        assert front.metrics.restart_required._value.get() == 1
        assert front.policy.backends == (ipaddress.ip_address("198.18.22.2").packed,)
        write_config(tmp_path)
        front.reload()
        assert front.metrics.restart_required._value.get() == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    reloads = [entry for entry in events if entry["event"] in ("restart_required", "config_reloaded")]
    assert [(entry["event"], entry.get("keys")) for entry in reloads] == [
        ("restart_required", ["front.queue_num", "front.data_plane"]), ("config_reloaded", None)]


def test_farm_mtu_is_read_bounded_and_reaches_the_policy(tmp_path):
    config = write_config(tmp_path)
    def policy(path):
        loaded = load_config(path)
        return service.build_policy(loaded, loaded.salt_schedule())

    assert policy(config).farm_mtu == 1500
    for value, accepted in ((9000, True), (576, True), (575, False), (65536, False)):
        config.write_text(config.read_text().split("farm_mtu")[0].rstrip("\n") + f"\nfarm_mtu: {value}\n")
        if accepted:
            assert policy(config).encapsulation_mtu == value - encap.OVERHEAD
        else:
            with pytest.raises(ConfigError, match=r"synproxy.yaml:\d+: farm_mtu: must be between 576 and 65535"):
                load_config(config)


def test_options_answered_unless_the_configuration_says_the_backends_refuse_them(tmp_path):
    """A backend whose tcp_sack, tcp_ecn, tcp_timestamps or tcp_window_scaling is 0 cannot honour what a
    front's SYN-ACK promised: the configuration tells the fronts not to (docs/front.md, "Real clients")."""
    keys = ("sack", "ecn", "timestamps", "window_scaling")
    config = write_config(tmp_path)
    loaded = load_config(config)
    policy = service.build_policy(loaded, loaded.salt_schedule())
    assert [getattr(policy, key) for key in keys] == [True] * len(keys)
    config.write_text(config.read_text() + "".join(f"{key}: false\n" for key in keys))
    loaded = load_config(config)
    policy = service.build_policy(loaded, loaded.salt_schedule())
    assert [getattr(policy, key) for key in keys] == [False] * len(keys)
    config.write_text(config.read_text() + "ecn: off\n")
    with pytest.raises(ConfigError, match=r"synproxy.yaml:\d+: ecn: "):
        load_config(config)


class KernelCounts:
    """Stands in for the loaded programs' counters."""

    def counts(self, path: str) -> dict:
        return {("syn_answered", 4): 7 if path == "tc" else 11, ("validated", 6): 0 if path == "tc" else 3}

    def vip_port_counts(self) -> dict:
        return {(ipaddress.ip_address(VIP4), 80): (18, 2, 40), (ipaddress.ip_address(VIP6), 443): (0, 3, 0)}


def test_per_vip_and_port_the_queue_and_the_programs_add_up(front):
    """synproxy_front_vip_packets_total: the queue's SYNs answered and segments forwarded, per VIP and port,
    plus the programs' own per-VIP counts; nothing for packets to no configured VIP and port."""
    front.raw_ipv4 = RecordingSocket()
    syn = raw(IP(src="198.18.1.2", dst=VIP4) / TCP(sport=40001, dport=80, flags="S", options=[("MSS", 1460)]))
    stray = raw(IP(src="198.18.1.2", dst="198.19.0.99") / TCP(sport=40001, dport=80, flags="S"))
    for payload in (syn, syn, data(4), data(6), stray):
        front.on_packet(QueuedPacket(payload))
    metrics = front.metrics
    metrics.report(0, time.monotonic(), front.counts)
    metrics.kernel_path = KernelCounts()
    found = {(s.labels["vip"], s.labels["port"], s.labels["outcome"]): s.value
             for family in metrics.registry.collect() for s in family.samples
             if s.name == "synproxy_front_vip_packets_total"}
    assert found == {(VIP4, "80", "syn_answered"): 2 + 18, (VIP4, "80", "forwarded"): 1 + 40,
                     (VIP4, "80", "validated"): 2, (VIP6, "80", "forwarded"): 1,
                     (VIP6, "443", "syn_answered"): 0, (VIP6, "443", "validated"): 3, (VIP6, "443", "forwarded"): 0}


def test_the_data_plane_and_the_programs_counts_are_exported():
    metrics = service.FrontMetrics(queue_num=0)

    def samples() -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in metrics.registry.collect() for s in family.samples}

    assert samples()[("synproxy_front_data_plane", (("mode", "nfqueue"),))] == 1
    metrics.kernel_path, metrics.data_plane, metrics.xdp_modes = KernelCounts(), "xdp", {"eth0": "native"}
    found = samples()
    assert found[("synproxy_front_data_plane", (("mode", "xdp"),))] == 1
    assert found[("synproxy_front_xdp_attached", (("interface", "eth0"), ("mode", "native")))] == 1
    kernel = "synproxy_front_kernel_packets_total"
    assert found[(kernel, (("family", "ipv4"), ("outcome", "syn_answered"), ("path", "tc")))] == 7
    assert found[(kernel, (("family", "ipv4"), ("outcome", "syn_answered"), ("path", "xdp")))] == 11
    assert found[(kernel, (("family", "ipv6"), ("outcome", "validated"), ("path", "xdp")))] == 3


def test_an_attack_is_summarised_every_period_and_its_end_once():
    summary = service.AttackSummary()
    period = service.SUMMARY_SECONDS
    assert summary.update({"syn_answered": 0}, 0.0) is None
    assert summary.update({"syn_answered": 50}, period) is None, "ordinary traffic logs nothing"
    found = summary.update({"syn_answered": 50 + 20_000 * int(period), "queue_dropped": 0}, 2 * period)
    assert found == {"event": "under_attack", "seconds": period, "per_second": {"syn_answered": 20_000.0}}
    found = summary.update({"syn_answered": 50 + 20_000 * int(period), "queue_dropped": 3}, 3 * period)
    assert found["event"] == "under_attack" and found["per_second"] == {"queue_dropped": 0.3}
    assert summary.update({"syn_answered": 60 + 20_000 * int(period), "queue_dropped": 3}, 4 * period)["event"] == \
        "attack_ended"
    assert summary.update({"syn_answered": 70 + 20_000 * int(period), "queue_dropped": 3}, 5 * period) is None


def worker_counts(syns: int, forwarded: int, seconds: float) -> service.PacketCounts:
    counts = service.PacketCounts()
    counts.packets["syn_answered", 4] = syns
    counts.forwarded["198.18.20.2"] = forwarded
    counts.observe(seconds)
    return counts


def test_workers_counts_add_up_across_reports_and_a_restart():
    """The parent's metrics: each queue's latest report, plus what its dead workers reported; a scrape
    waits for a report from every live worker newer than itself."""
    metrics = service.FrontMetrics(queue_num=4, workers=2)

    def samples() -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in metrics.registry.collect() for s in family.samples}

    metrics.report(4, time.monotonic(), worker_counts(10, 3, 3e-6))
    metrics.report(5, time.monotonic(), worker_counts(7, 1, 2e-3))
    found = samples()
    assert found[("synproxy_front_packets_total", (("family", "ipv4"), ("outcome", "syn_answered")))] == 17
    assert found[("synproxy_front_forwarded_packets_total", (("backend", "198.18.20.2"),))] == 4
    assert found[("synproxy_front_worker_packets_total", (("queue", "4"),))] == 10
    assert found[("synproxy_front_worker_packets_total", (("queue", "5"),))] == 7
    histogram = "synproxy_front_packet_processing_seconds"  # the buckets and names prometheus_client's Histogram had
    assert found[(f"{histogram}_bucket", (("le", "5e-06"),))] == 1
    assert found[(f"{histogram}_bucket", (("le", "0.001"),))] == 1
    assert found[(f"{histogram}_bucket", (("le", "0.01"),))] == found[(f"{histogram}_bucket", (("le", "+Inf"),))] == 2
    assert found[(f"{histogram}_count", ())] == 2 and found[(f"{histogram}_sum", ())] == pytest.approx(2.003e-3)
    metrics.retire(5)  # its worker died; the new one starts from 0
    metrics.live = {4, 5}
    late = threading.Timer(0.2, lambda: (metrics.report(4, time.monotonic(), worker_counts(50, 3, 3e-6)),
                                         metrics.report(5, time.monotonic(), worker_counts(2, 0, 3e-6))))
    started = time.monotonic()
    late.start()
    found = samples()
    assert 0.2 <= time.monotonic() - started < service.SCRAPE_WAIT_SECONDS, "waited for both reports, no longer"
    assert found[("synproxy_front_worker_packets_total", (("queue", "5"),))] == 7 + 2
    assert found[("synproxy_front_packets_total", (("family", "ipv4"), ("outcome", "syn_answered")))] == 50 + 9
    assert found[("synproxy_front_worker_restarts_total", ())] == 0  # counted by the supervisor, not here


class KernelCookies:
    """Stands in for the loaded programs' counters: the TFO cookies each issued, the TFO SYNs each
    accepted, and their fallbacks."""

    def counts(self, path: str) -> dict:
        return {("syn_answered", 4): 9, ("fastopen_cookie_issued", 4): 2 if path == "tc" else 5,
                ("fastopen_cookie_issued", 6): 1, ("fastopen_accepted", 4): 10 if path == "tc" else 20,
                ("fastopen_accepted", 6): 7, ("fastopen_rate_limited", 6): 3, ("fastopen_too_big", 4): 0}

    def vip_port_counts(self) -> dict:
        return {}


def test_tcp_fast_open_is_exported_from_the_workers_and_the_programs():
    """Cookies issued by the handler (requests and fallbacks, not `disabled`) and by both programs;
    accepted and fallbacks by reason (every reason present from the start), the handler's and both
    programs'."""
    metrics = service.FrontMetrics(queue_num=4, workers=2)
    first, second = service.PacketCounts(), service.PacketCounts()
    first.fastopen.update({"requested": 3, "accepted": 4, "invalid_cookie": 1, "disabled": 6})
    second.fastopen.update({"accepted": 1, "rate_limited": 2})
    metrics.report(4, time.monotonic(), first)
    metrics.report(5, time.monotonic(), second)
    metrics.kernel_path, metrics.xdp_modes = KernelCookies(), {"eth0": "native"}
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in metrics.registry.collect() for s in family.samples}
    assert found[("synproxy_front_fastopen_cookies_issued_total", ())] == 3 + 1 + 2 + (2 + 1) + (5 + 1)
    assert found[("synproxy_front_fastopen_accepted_total", ())] == 5 + (10 + 7) + (20 + 7)
    fallbacks = {dict(labels)["reason"]: value for (name, labels), value in found.items()
                 if name == "synproxy_front_fastopen_fallbacks_total"}
    assert fallbacks == {"disabled": 6, "invalid_cookie": 1, "no_data": 0, "rate_limited": 2 + 3 + 3, "too_big": 0}
