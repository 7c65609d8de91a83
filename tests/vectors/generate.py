"""Regenerate tests/vectors/cookies.json: `python3 tests/vectors/generate.py`.

The vectors pin docs/cookie.md for the Python core and the backend's BPF program alike. Deterministic:
the same code always writes the same file, so a diff shows a change to the cookie.
"""

from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path

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
from synproxy.salt import derive_salt

OUT = Path(__file__).with_name("cookies.json")
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


def render(document: dict) -> str:
    return json.dumps(document, indent=1) + "\n"


def main() -> None:
    document = build_document()
    OUT.write_text(render(document))
    print(f"wrote {len(document['vectors'])} vectors to {OUT}")


if __name__ == "__main__":
    main()
