"""Regenerate tests/vectors/cookies.json, encap.json and tfo.json: `python3 tests/vectors/generate.py`.

The vectors pin docs/cookie.md (the cookie, and the TCP Fast Open keys and cookies) and the encapsulation
of docs/backend.md for the Python core and the BPF programs alike. Deterministic: the same code always writes the same files, so a diff shows
a change to the cookie or the encapsulation.
"""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path

from synproxy import encap
from synproxy.cookie import (
    MSS_TABLE,
    WSCALE_MAX,
    SynOptions,
    cookie_mac,
    encode_data,
    mac_input,
    make_cookie,
    mss_index,
)
from synproxy.packet import (
    ACK,
    FIN,
    PSH,
    RST,
    FastOpen,
    build_fastopen_option,
    build_tcp_options,
    build_tcp_packet,
    parse_tcp,
)
from synproxy.salt import derive_salt
from synproxy.tfo import TFO_KEY_INFO_PREFIX, derive_tfo_key, fastopen_cookie, fastopen_keys, sysctl_key_value

OUT = Path(__file__).with_name("cookies.json")
ENCAP_OUT = Path(__file__).with_name("encap.json")
TFO_OUT = Path(__file__).with_name("tfo.json")
TFO_KEY_PERIOD = 86400
# Key periods: the first ones, a day of 2024 and the next, and both sides of 2**32 (the counter is 8 bytes).
TFO_KEY_PERIODS = (0, 1, 19_800, 19_801, 0xFFFFFFFF, 0x100000000)
FRONT, BACKEND, ENCAP_PORT = "198.18.10.2", "198.18.20.2", 6080
# The flow's former owners in the vectors that name them: previous only, and previous and earlier.
PREVIOUS, EARLIER = "198.18.21.2", "198.18.22.2"
SECRET = bytes(range(32))
PERIOD = 60
TUPLES = {
    4: ("198.18.1.2", "198.19.0.10"),
    6: ("2001:db8:1::2", "2001:db8:ffff::10"),
}
# Epochs around the 2**32 wrap of the MAC's epoch field and ordinary ones.
EPOCHS = (0, 1, 2, 3, 29_000_000, 29_000_001, 0xFFFFFFFF, 0x100000000)


def vector(rng: random.Random, family: int, options: SynOptions, epoch: int, client_mss: int | None,
           name: str) -> dict:
    saddr_text, daddr_text = TUPLES[family]
    saddr = ipaddress.ip_address(saddr_text).packed
    daddr = ipaddress.ip_address(daddr_text).packed
    sport, dport = rng.randrange(1024, 65536), rng.choice((80, 443, 7))
    client_isn = rng.randrange(1 << 32)
    salt = derive_salt(SECRET, epoch)
    data = encode_data(family, SynOptions(client_mss, options.wscale, options.sack, options.ecn), epoch)
    message = mac_input(saddr, daddr, sport, dport, client_isn, epoch, data)
    cookie = make_cookie(salt, epoch, saddr, daddr, sport, dport, client_isn,
                         SynOptions(client_mss, options.wscale, options.sack, options.ecn))
    return {
        "name": name, "family": family, "saddr": saddr_text, "daddr": daddr_text,
        "sport": sport, "dport": dport, "client_isn": client_isn, "epoch": epoch,
        "salt": salt.hex(),
        "syn": {"mss": client_mss, "wscale": options.wscale, "sack": options.sack,
                "ecn": options.ecn},
        "mss_index": mss_index(family, client_mss), "data": data,
        "mac_input": message.hex(), "mac": cookie_mac(salt, message),
        "cookie": cookie, "ack": (cookie + 1) & 0xFFFFFFFF,
        "decoded": {"mss": options.mss, "wscale": options.wscale, "sack": options.sack,
                    "ecn": options.ecn},
    }


def build_document() -> dict:
    rng = random.Random(20261123)
    vectors = []
    for family, table in MSS_TABLE.items():
        for index, mss in enumerate(table):
            # The client's MSS just above the table value still maps to it.
            for client_mss in (mss, mss + 1):
                opts = SynOptions(mss, 7, True, False)
                vectors.append(vector(rng, family, opts, 29_000_000, client_mss,
                                      f"v{family} mss index {index} client mss {client_mss}"))
        vectors.append(vector(rng, family, SynOptions(table[0], 7, True, False), 29_000_000, None,
                              f"v{family} no mss option"))
        for wscale in [*range(WSCALE_MAX + 1), None]:
            for sack in (False, True):
                for ecn in (False, True):
                    opts = SynOptions(table[3], wscale, sack, ecn)
                    vectors.append(vector(rng, family, opts, 29_000_000, table[3],
                                          f"v{family} wscale {wscale} sack {sack} ecn {ecn}"))
        for epoch in EPOCHS:
            vectors.append(vector(rng, family, SynOptions(table[2], 0, False, True), epoch, table[2],
                                  f"v{family} epoch {epoch}"))
    return {"spec": "docs/cookie.md", "secret": SECRET.hex(), "period_seconds": PERIOD,
            "vectors": vectors}


def encap_vector(rng: random.Random, name: str, inner: bytes, validated: bool, key: bytes,
                 former: bytes = encap.NO_FORMER_OWNERS) -> dict:
    segment = parse_tcp(inner)
    front, backend = (ipaddress.ip_address(a).packed for a in (FRONT, BACKEND))
    flags = encap.FLAG_VALIDATED if validated else 0
    message = encap.mac_input(front, backend, segment.saddr, segment.daddr, segment.sport, segment.dport, flags,
                              former)
    flow_hash = rng.getrandbits(64)
    packet = encap.encapsulate(inner, segment, front, backend, ENCAP_PORT, flow_hash, validated, key, former)
    vector = {
        "name": name, "family": segment.family, "validated": validated, "flow_hash": flow_hash,
        "former": [str(ipaddress.ip_address(former[:4])), str(ipaddress.ip_address(former[4:]))],
        "inner": inner.hex(), "mac_input": message.hex(), "mac": encap.encap_mac(key, message), "packet": packet.hex(),
    }
    chained = encap.chain(packet, segment, key)
    if chained is not None:  # what BACKEND sends on to the previous owner, and that one to the earlier
        vector["chained"] = [chained.hex()]
        again = encap.chain(chained, segment, key)
        if again is not None:
            vector["chained"].append(again.hex())
    return vector


def build_encap_document(cookies: dict) -> dict:
    """Per family: the handshake ACK of the first cookie vector, flagged VALIDATED, then unflagged
    segments of an established connection on the same tuple (plain ACK, data, FIN, RST); each naming no
    former owner, then PREVIOUS, then PREVIOUS and EARLIER, with the packets the chain passes on."""
    rng = random.Random(20261130)
    key = encap.encap_key(SECRET)
    previous, earlier = (ipaddress.ip_address(a).packed for a in (PREVIOUS, EARLIER))
    vectors = []
    for family in (4, 6):
        cookie = next(v for v in cookies["vectors"] if v["family"] == family)
        saddr, daddr = (ipaddress.ip_address(cookie[a]).packed for a in ("saddr", "daddr"))
        seq = (cookie["client_isn"] + 1) & 0xFFFFFFFF

        def segment(flags: int, payload: bytes = b"", options: bytes = b"") -> bytes:
            return build_tcp_packet(saddr, daddr, cookie["sport"], cookie["dport"], seq, cookie["ack"], flags,  # noqa: B023
                                    502, options, payload)

        timestamp = build_tcp_options(None, None, False, (1234, 5678))
        for former, named in ((encap.NO_FORMER_OWNERS, ""), (previous + encap.NO_OWNER, ", previous owner named"),
                              (previous + earlier, ", previous and earlier owners named")):
            vectors.append(encap_vector(rng, f"v{family} handshake ACK, validated{named}",
                                        segment(ACK, options=timestamp), True, key, former))
            for name, flags, payload in (("ACK", ACK, b""), ("data", PSH | ACK, b"GET / HTTP/1.0\r\n\r\n"),
                                         ("FIN", FIN | ACK, b""), ("RST", RST, b"")):
                vectors.append(encap_vector(rng, f"v{family} {name}{named}", segment(flags, payload), False, key,
                                            former))
    return {"spec": "docs/backend.md", "secret": SECRET.hex(), "encap_key": key.hex(), "front": FRONT,
            "backend": BACKEND, "previous": PREVIOUS, "earlier": EARLIER, "encap_port": ENCAP_PORT,
            "vectors": vectors}


def tfo_cookie_vector(key_period: int, saddr_text: str, daddr_text: str) -> dict:
    key = derive_tfo_key(SECRET, key_period)
    saddr, daddr = (ipaddress.ip_address(a).packed for a in (saddr_text, daddr_text))
    cookie = fastopen_cookie(key, saddr, daddr)
    return {"family": 4 if len(saddr) == 4 else 6, "saddr": saddr_text, "daddr": daddr_text,
            "key_period": key_period, "key": key.hex(), "message": (saddr + daddr).hex(), "cookie": cookie.hex(),
            "option": build_fastopen_option(FastOpen(cookie, False)).hex(),
            "option_experimental": build_fastopen_option(FastOpen(cookie, True)).hex()}


def build_tfo_document() -> dict:
    """Keys per key period, the (primary, backup) pair and sysctl text at moments around a boundary, and
    cookies: the cookie vectors' address pairs and random ones, each family."""
    rng = random.Random(20261130_15)
    keys = [{"key_period": n, "info": (TFO_KEY_INFO_PREFIX + n.to_bytes(8, "big")).hex(),
             "key": derive_tfo_key(SECRET, n).hex()} for n in TFO_KEY_PERIODS]
    schedule = []
    for now in (19_801 * TFO_KEY_PERIOD - 0.5, 19_801 * TFO_KEY_PERIOD, 19_801 * TFO_KEY_PERIOD + 0.5):
        primary, backup = fastopen_keys(SECRET, now, TFO_KEY_PERIOD)
        schedule.append({"now": now, "primary": primary.hex(), "backup": backup.hex(),
                         "sysctl": sysctl_key_value((primary, backup))})
    cookies = [tfo_cookie_vector(n, *TUPLES[family]) for family in (4, 6) for n in (19_800, 19_801)]
    for family, bits in ((4, 32), (6, 128)):
        for _ in range(4):
            saddr, daddr = (str(ipaddress.ip_address(rng.getrandbits(bits)) if family == 6
                                else ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(2))
            cookies.append(tfo_cookie_vector(rng.choice(TFO_KEY_PERIODS), saddr, daddr))
    return {"spec": "docs/cookie.md", "secret": SECRET.hex(), "key_period_seconds": TFO_KEY_PERIOD,
            "keys": keys, "schedule": schedule, "cookies": cookies}


def render(document: dict) -> str:
    return json.dumps(document, indent=1) + "\n"


def main() -> None:
    document = build_document()
    OUT.write_text(render(document))
    print(f"wrote {len(document['vectors'])} vectors to {OUT}")
    encap_document = build_encap_document(document)
    ENCAP_OUT.write_text(render(encap_document))
    print(f"wrote {len(encap_document['vectors'])} vectors to {ENCAP_OUT}")
    tfo_document = build_tfo_document()
    TFO_OUT.write_text(render(tfo_document))
    print(f"wrote {len(tfo_document['cookies'])} cookies to {TFO_OUT}")


if __name__ == "__main__":
    main()
