import json
from pathlib import Path

import pytest

from synproxy.bpf.loading import build_object
from synproxy.front.fastpath import FastPath

VECTORS_FILE = Path(__file__).parent / "vectors" / "cookies.json"
ENCAP_VECTORS_FILE = VECTORS_FILE.with_name("encap.json")


@pytest.fixture(scope="session")
def cookie_vectors() -> dict:
    return json.loads(VECTORS_FILE.read_text())


@pytest.fixture(scope="session")
def encap_vectors() -> dict:
    return json.loads(ENCAP_VECTORS_FILE.read_text())


@pytest.fixture(scope="module")
def fast_path(policy, schedule):
    """The front's programs loaded (not attached) and configured with the requesting module's own
    `policy` and `schedule` fixtures."""
    loaded = FastPath(build_object("front"))
    loaded.configure(policy, schedule)
    yield loaded
    loaded.close()
