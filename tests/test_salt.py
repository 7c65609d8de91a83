import pytest

from synproxy.front.handler import FrontPolicy, handle
from synproxy.packet import ACK, SYN, build_tcp_options, build_tcp_packet, parse_tcp
from synproxy.salt import SaltSchedule, SecretRotation, derive_salt


def test_salt_is_deterministic_and_differs_per_epoch_and_secret():
    assert derive_salt(b"s" * 32, 5) == derive_salt(b"s" * 32, 5)
    assert len(derive_salt(b"s" * 32, 5)) == 16
    assert derive_salt(b"s" * 32, 5) != derive_salt(b"s" * 32, 6)
    assert derive_salt(b"s" * 32, 5) != derive_salt(b"t" * 32, 5)


def test_accepted_epochs_are_current_and_previous_widened_by_skew():
    exact = SaltSchedule((b"s" * 32,), period=60, skew=0)
    assert list(exact.accepted_epochs(600 + 30)) == [9, 10]
    skewed = SaltSchedule((b"s" * 32,), period=60, skew=2)
    assert list(skewed.accepted_epochs(600 + 1)) == [8, 9, 10]
    assert list(skewed.accepted_epochs(600 + 59)) == [9, 10, 11]
    widest = SaltSchedule((b"s" * 32,), period=60, skew=60)
    assert len(widest.accepted_epochs(630)) <= 4


def test_epoch_bits_name_one_epoch():
    schedule = SaltSchedule((b"s" * 32,), period=60, skew=2)
    assert schedule.epoch_for_bits(10 % 4, 601) == 10
    assert schedule.epoch_for_bits(9 % 4, 601) == 9
    assert schedule.epoch_for_bits(7 % 4, 601) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"secrets": ()}, "at least one"),
    ({"secrets": (b"short",)}, "at least 16"),
    ({"secrets": (b"s" * 32,), "period": 0}, "positive"),
    ({"secrets": (b"s" * 32,), "skew": 61}, "skew"),
])
def test_invalid_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SaltSchedule(**kwargs)


def test_replaced_secret_stays_accepted_for_the_grace_period_only():
    old, new = b"o" * 32, b"n" * 32
    rotation = SecretRotation()
    before = rotation.effective(SaltSchedule((old,), period=60, skew=2), None, 1000.0)
    assert before.secrets == (old,)
    after = rotation.effective(SaltSchedule((new,), period=60, skew=2), before, 1000.0)
    assert after.secrets == (new, old)
    assert rotation.effective(SaltSchedule((new,), period=60, skew=2), after, 1121.0).secrets == (new, old)
    assert rotation.effective(SaltSchedule((new,), period=60, skew=2), after, 1123.0).secrets == (new,)


OLD, NEW = b"o" * 32, b"n" * 32
CLIENT, VIP = bytes([198, 18, 1, 2]), bytes([198, 19, 0, 10])
POLICY = FrontPolicy(vips=frozenset({VIP}), ports=frozenset({80}), farm_address=bytes([198, 18, 10, 2]),
                     backends=(bytes([198, 18, 20, 2]),), encap_port=6080, encap_key=bytes(16),
                     flow_key=b"f" * 16)
START = 1.8e9
CLOCK_OFFSETS = (-1.0, 0.0, 1.0)  # the fronts' clocks, within the 2 s skew tolerance


class RollingFront:
    """One front through a rotation: its configured secrets change at its own switch times, and it
    keeps a dropped secret for the grace period, as synproxy.front.service.Front does on SIGHUP."""

    def __init__(self, plan: list[tuple[float, tuple[bytes, ...]]], clock_offset: float):
        self.plan, self.clock_offset = plan, clock_offset
        self.rotation = SecretRotation()
        self.schedule: SaltSchedule | None = None

    def at(self, now: float) -> SaltSchedule:
        configured = [secrets for switch, secrets in self.plan if switch <= now][-1]
        self.schedule = self.rotation.effective(SaltSchedule(configured, period=60, skew=2), self.schedule, now)
        return self.schedule


def rollout(phases: list[tuple[bytes, ...]]) -> list[str]:
    """Three fronts go through ``phases`` one after another, each front 3 minutes after the previous one,
    phases 10 minutes apart. Every 30 s (and 1 s either side of each switch, for handshakes in flight
    across it) every front answers a SYN and every front gets the client's ACK 2 s later. Returns the
    handshakes that did not validate."""
    fronts = [RollingFront([(START + 600 * phase + 180 * index if phase else 0.0, secrets)
                            for phase, secrets in enumerate(phases)], offset)
              for index, offset in enumerate(CLOCK_OFFSETS)]
    failed = []
    for step in range(-2, 20 * len(phases)):
        for when in (START + 30 * step - 1, START + 30 * step + 1):
            sport = 1024 + step % 60000
            syn = build_tcp_packet(CLIENT, VIP, sport, 80, 1000, 0, SYN, 64240, build_tcp_options(1460, 7, True))
            for minter, front in enumerate(fronts):
                now = when + front.clock_offset
                reply = handle(syn, now, front.at(now), POLICY)
                cookie = parse_tcp(reply.packet).seq
                ack = build_tcp_packet(CLIENT, VIP, sport, 80, 1001, (cookie + 1) & 0xFFFFFFFF, ACK, 502)
                for checker, other in enumerate(fronts):
                    later = when + 2 + other.clock_offset
                    outcome = handle(ack, later, other.at(later), POLICY).outcome
                    if outcome != "validated":
                        failed.append(f"t+{when - START:.0f}s minted by front {minter}, front {checker}: {outcome}")
    return failed


def test_two_phase_rotation_keeps_every_handshake_valid_on_every_front():
    """Accept everywhere, then mint everywhere, then drop: fronts switched minutes apart never disagree."""
    assert rollout([(OLD,), (OLD, NEW), (NEW, OLD), (NEW,)]) == []


def test_one_phase_rotation_loses_handshakes_while_fronts_disagree():
    """The old procedure (new secret minting at once, old one kept): a front not yet switched rejects
    the cookies of a front that has."""
    failed = rollout([(OLD,), (NEW, OLD), (NEW,)])
    assert "t+629s minted by front 0, front 1: forwarded_bad_mac" in failed
    assert all("forwarded_bad_mac" in line for line in failed)
    # Minting with the new secret and dropping the old one in one step fails too, once the grace is over
    # on the front that switched first while the last one still mints with the old secret.
    assert rollout([(OLD,), (OLD, NEW), (NEW,)])
