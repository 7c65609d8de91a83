import json
from pathlib import Path

import pytest

VECTORS_FILE = Path(__file__).parent / "vectors" / "cookies.json"
ENCAP_VECTORS_FILE = VECTORS_FILE.with_name("encap.json")


@pytest.fixture(scope="session")
def cookie_vectors() -> dict:
    return json.loads(VECTORS_FILE.read_text())


@pytest.fixture(scope="session")
def encap_vectors() -> dict:
    return json.loads(ENCAP_VECTORS_FILE.read_text())
