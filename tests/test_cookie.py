"""The cookie against its specification: vectors, round trips, epochs, binding and forgery rate."""

import ipaddress
import os
import random
import time

from hypothesis import given
from hypothesis import strategies as st

from synproxy.cookie import (
    MSS_TABLE,
    WSCALE_MAX,
    Reject,
    SynOptions,
    check_cookie,
    cookie_mac,
    decode_data,
    encode_data,
    mac_input,
    make_cookie,
    mss_index,
)
from synproxy.salt import SaltSchedule, derive_salt
from tests.conftest import VECTORS_FILE
from tests.vectors import generate

SECRET = b"k" * 32
PERIOD = 60.0
SCHEDULE = SaltSchedule((SECRET,), period=PERIOD, skew=0.0)

families = st.sampled_from([4, 6])
ports = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
options = st.builds(SynOptions, mss=st.integers(0, 65535) | st.none(),
                    wscale=st.integers(0, 255) | st.none(), sack=st.booleans(), ecn=st.booleans())


def addresses(family):
    return st.binary(min_size=4 if family == 4 else 16, max_size=4 if family == 4 else 16)


@st.composite
def flows(draw):
    family = draw(families)
    return (draw(addresses(family)), draw(addresses(family)), draw(ports), draw(ports), draw(u32))


def expected_options(family: int, syn: SynOptions) -> SynOptions:
    wscale = None if syn.wscale is None else min(syn.wscale, WSCALE_MAX)
    return SynOptions(MSS_TABLE[family][mss_index(family, syn.mss)], wscale, syn.sack, syn.ecn)


def mint(flow, syn: SynOptions, now: float, secret: bytes = SECRET) -> int:
    epoch = SCHEDULE.current_epoch(now)
    return make_cookie(derive_salt(secret, epoch), epoch, *flow, syn)


def test_vectors_file_is_what_the_generator_writes():
    assert VECTORS_FILE.read_text() == generate.render(generate.build_document())


def test_vectors_match_the_implementation(cookie_vectors):
    secret = bytes.fromhex(cookie_vectors["secret"])
    schedule = SaltSchedule((secret,), period=cookie_vectors["period_seconds"], skew=0.0)
    assert len(cookie_vectors["vectors"]) > 100
    for v in cookie_vectors["vectors"]:
        saddr = ipaddress.ip_address(v["saddr"]).packed
        daddr = ipaddress.ip_address(v["daddr"]).packed
        syn = SynOptions(v["syn"]["mss"], v["syn"]["wscale"], v["syn"]["sack"], v["syn"]["ecn"])
        assert derive_salt(secret, v["epoch"]).hex() == v["salt"], v["name"]
        assert encode_data(v["family"], syn, v["epoch"]) == v["data"], v["name"]
        message = mac_input(saddr, daddr, v["sport"], v["dport"], v["client_isn"], v["epoch"], v["data"])
        assert message.hex() == v["mac_input"], v["name"]
        assert cookie_mac(bytes.fromhex(v["salt"]), message) == v["mac"], v["name"]
        assert v["cookie"] == v["mac"] << 10 | v["data"] and v["ack"] == (v["cookie"] + 1) % 2**32
        now = v["epoch"] * schedule.period + 1
        decoded = check_cookie(schedule, now, saddr, daddr, v["sport"], v["dport"], v["client_isn"],
                               v["cookie"])
        assert decoded == SynOptions(**v["decoded"]), v["name"]


def test_vectors_cover_every_option_value(cookie_vectors):
    seen = {(v["family"], v["mss_index"], v["decoded"]["wscale"], v["decoded"]["sack"], v["decoded"]["ecn"])
            for v in cookie_vectors["vectors"]}
    for family in (4, 6):
        assert {s[1] for s in seen if s[0] == family} == {0, 1, 2, 3}
        assert {s[2] for s in seen if s[0] == family} == {*range(15), None}
        assert {(s[3], s[4]) for s in seen if s[0] == family} == {(a, b) for a in (0, 1) for b in (0, 1)}


@given(flows(), options, st.floats(0, 2**40))
def test_round_trip_of_every_option_combination(flow, syn, now):
    family = 4 if len(flow[0]) == 4 else 6
    cookie = mint(flow, syn, now)
    assert check_cookie(SCHEDULE, now, *flow, cookie) == expected_options(family, syn)
    assert decode_data(family, cookie & 0x3FF) == expected_options(family, syn)


# `where` stays clear of the epoch's end: epoch + later + 0.9999999999999999 rounds up to the next
# whole number in floating point, which moves the check into a later epoch than the test means.
@given(flows(), options, st.integers(0, 2**33), st.floats(0, 0.99))
def test_epoch_n_validates_in_n_and_n_plus_1_not_n_plus_2(flow, syn, epoch, where):
    cookie = mint(flow, syn, (epoch + where) * PERIOD)
    for later, valid in ((0, True), (1, True), (2, False), (3, False), (4, False)):
        result = check_cookie(SCHEDULE, (epoch + later + where) * PERIOD, *flow, cookie)
        assert isinstance(result, SynOptions) is valid, later
    if epoch:
        # A cookie from the future is refused unless the skew tolerance covers it.
        assert check_cookie(SCHEDULE, (epoch - 1 + where) * PERIOD, *flow, cookie) == Reject.EXPIRED_EPOCH


def test_skew_tolerance_accepts_slightly_fast_and_slow_clocks():
    schedule = SaltSchedule((SECRET,), period=PERIOD, skew=2.0)
    flow = (b"\1\2\3\4", b"\5\6\7\10", 1000, 80, 7)
    epoch = 1000
    cookie = mint(flow, SynOptions(1460, 7, True, False), (epoch + 1) * PERIOD - 0.5)
    # Minted by a node 1 s ahead: a node still in the previous epoch accepts it.
    assert isinstance(check_cookie(schedule, epoch * PERIOD - 1.0, *flow, cookie), SynOptions)
    # Beyond the tolerance it is refused as an epoch not (yet or any more) accepted.
    assert check_cookie(schedule, epoch * PERIOD - 3.0, *flow, cookie) == Reject.EXPIRED_EPOCH
    assert isinstance(check_cookie(schedule, (epoch + 2) * PERIOD + 1.0, *flow, cookie), SynOptions)
    assert check_cookie(schedule, (epoch + 2) * PERIOD + 3.0, *flow, cookie) == Reject.EXPIRED_EPOCH


@given(flows(), options, st.integers(0, 4), st.data())
def test_cookie_is_bound_to_tuple_and_client_isn(flow, syn, field, data):
    cookie = mint(flow, syn, 1e9)
    changed = list(flow)
    original = changed[field]
    if isinstance(original, bytes):
        changed[field] = data.draw(st.binary(min_size=len(original), max_size=len(original))
                                   .filter(lambda b: b != original))
    else:
        limit = 65535 if field in (2, 3) else 2**32 - 1
        changed[field] = data.draw(st.integers(0, limit).filter(lambda n: n != original))
    assert check_cookie(SCHEDULE, 1e9, *changed, cookie) == Reject.BAD_MAC


@given(flows(), options, st.binary(min_size=16, max_size=64).filter(lambda s: s != SECRET))
def test_cookie_is_bound_to_the_secret(flow, syn, other_secret):
    cookie = mint(flow, syn, 1e9, secret=other_secret)
    assert check_cookie(SCHEDULE, 1e9, *flow, cookie) == Reject.BAD_MAC


@given(flows(), options, st.integers(0, 9))
def test_options_are_authenticated(flow, syn, bit):
    """Changing any data bit (options or epoch) breaks the MAC: an attacker cannot pick options."""
    cookie = mint(flow, syn, 1e9) ^ (1 << bit)
    assert isinstance(check_cookie(SCHEDULE, 1e9, *flow, cookie), Reject)


def test_retired_secret_validates_during_rotation():
    new = b"n" * 32
    flow = (b"\1\2\3\4", b"\5\6\7\10", 1000, 80, 7)
    old_cookie = mint(flow, SynOptions(1460, 7, True, False), 1e9, secret=SECRET)
    rotating = SaltSchedule((new, SECRET), period=PERIOD, skew=0.0)
    assert isinstance(check_cookie(rotating, 1e9, *flow, old_cookie), SynOptions)
    assert rotating.minting_salt(1e9)[1] == derive_salt(new, SCHEDULE.current_epoch(1e9))
    after_grace = SaltSchedule((new,), period=PERIOD, skew=0.0)
    assert check_cookie(after_grace, 1e9, *flow, old_cookie) == Reject.BAD_MAC


def test_forgery_rate_of_random_acks_fits_the_specification():
    """Random ACKs (random 4-tuple, client ISN, cookie and arrival time) against a node with the default
    period and skew: acceptance must fit ``f × 2⁻²²``, where f is the share of epoch-bit values naming an
    accepted epoch (docs/cookie.md, Security): 2 of 4, or 3 within ``skew`` of a boundary.

    `make test` runs 10⁶; SYNPROXY_LONG=1 runs 10⁷ and `-s` prints the figures docs/cookie.md quotes.
    """
    period, skew = 60.0, 2.0
    schedule = SaltSchedule((SECRET,), period=period, skew=skew)
    epoch_share = (2 + 2 * skew / period) / 4
    rng = random.Random(1)
    trials = 10_000_000 if os.environ.get("SYNPROXY_LONG") == "1" else 1_000_000
    accepted = expired = 0
    started = time.perf_counter()
    for _ in range(trials):
        flow = (rng.getrandbits(32).to_bytes(4, "big"), rng.getrandbits(32).to_bytes(4, "big"),
                rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(32))
        result = check_cookie(schedule, (1000 + rng.random()) * period, *flow, rng.getrandbits(32))
        if result is Reject.EXPIRED_EPOCH:
            expired += 1
        elif result is not Reject.BAD_MAC:
            accepted += 1
    seconds = time.perf_counter() - started
    expected = trials * epoch_share * 2**-22
    print(f"\n{trials} random ACKs in {seconds:.1f} s: {accepted} accepted (expected {expected:.2f}), "
          f"{expired / trials:.4%} refused by the epoch bits (expected {1 - epoch_share:.4%})")
    # Poisson(expected <= 1.24): P(accepted >= expected + 6) < 1e-4.
    assert accepted < expected + 6
    # Expired is Binomial(trials, 1 - f): within 5 standard deviations.
    assert abs(expired - trials * (1 - epoch_share)) < 5 * (trials * epoch_share * (1 - epoch_share)) ** 0.5
