import json
from pathlib import Path

import pytest

VECTORS_FILE = Path(__file__).parent / "vectors" / "cookies.json"


@pytest.fixture(scope="session")
def cookie_vectors() -> dict:
    return json.loads(VECTORS_FILE.read_text())
