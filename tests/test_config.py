"""Configuration: every kind of mistake gives one clear line naming file, line and key, and exit 2."""

import os
from pathlib import Path

import pytest

from synproxy.cli import main
from synproxy.config import ConfigError, load_config

GOOD = """\
vips: [198.19.0.10, 2001:db8:ffff::10]
ports: [80, 443]
secret_file: secret.hex
fronts: [198.18.10.2]
backends: [198.18.20.2, 198.18.21.2]
front:
  queue_num: 3
backend:
  interface: eth0
"""


@pytest.fixture
def workdir(tmp_path):
    secret = tmp_path / "secret.hex"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o600)
    return tmp_path


def write(workdir, text):
    path = workdir / "synproxy.yaml"
    path.write_text(text)
    return path


def test_good_config_loads_with_defaults(workdir):
    config = load_config(write(workdir, GOOD))
    assert [str(v) for v in config.vips] == ["198.19.0.10", "2001:db8:ffff::10"]
    assert config.secret_file == workdir / "secret.hex"
    assert (config.salt_period_seconds, config.clock_skew_seconds, config.server_wscale) == (60.0, 2.0, 7)
    assert (config.encap_port, config.front.queue_num, config.backend.interface) == (6080, 3, "eth0")
    assert config.salt_schedule().secrets == (bytes.fromhex("ab" * 32),)


@pytest.mark.parametrize("change, expected", [
    (("ports: [80, 443]", "ports: [eighty]"), ":2: ports: expected an integer, got str"),
    (("ports: [80, 443]", "ports: [80, 70000]"), ":2: ports: must be between 1 and 65535"),
    (("ports: [80, 443]", "ports: 80"), ":2: ports: expected a list"),
    (("  queue_num: 3", "  queue_num: 3\n  colour: blue"), ":8: front.colour: unknown key"),
    (("front:", "frontend: 1\nfront:"), ":6: frontend: unknown key"),
    (("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.19.0.300]"), ":1: vips: not an IP address"),
    (("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.19.0.10, 198.19.0.10]"),
     ":1: vips: lists the same entry twice"),
    (("vips: [198.19.0.10, 2001:db8:ffff::10]", "vips: [198.18.20.2]"),
     ":1: vips: 198.18.20.2 is also a front or backend address"),
    (("secret_file: secret.hex\n", ""), ": secret_file: required key is missing"),
    (("ports: [80, 443]", "ports: [80, 443]\nclock_skew_seconds: 90"),
     ":3: clock_skew_seconds: must not exceed salt_period_seconds"),
    (("ports: [80, 443]", "ports: [80, 443]\nsalt_period_seconds: 0"),
     ":3: salt_period_seconds: must be above 0"),
    (("ports: [80, 443]", "ports: [80, 443\n"), "not valid YAML"),
])
def test_mistakes_name_file_line_and_key(workdir, change, expected, capsys):
    path = write(workdir, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_secret_file_problems(workdir, capsys):
    path = write(workdir, GOOD)
    secret = workdir / "secret.hex"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible to group or others"):
        load_config(path)
    secret.chmod(0o600)
    secret.write_text("not hex")
    with pytest.raises(ConfigError, match="must hold hex text"):
        load_config(path)
    secret.write_text("abcd")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_config(path)
    os.remove(secret)
    with pytest.raises(ConfigError, match="cannot read secret file"):
        load_config(path)


def test_secret_never_appears_in_errors(workdir, capsys):
    secret_text = "c0ffee" * 8
    (workdir / "secret.hex").write_text(secret_text)
    (workdir / "secret.hex").chmod(0o640)
    assert main(["check-config", str(write(workdir, GOOD))]) == 2
    assert secret_text not in capsys.readouterr().err


def test_missing_and_empty_files(tmp_path, capsys):
    assert main(["check-config", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err
    (tmp_path / "empty.yaml").write_text("")
    assert main(["check-config", str(tmp_path / "empty.yaml")]) == 2
    assert "the file is empty" in capsys.readouterr().err


def test_check_config_accepts_the_example(workdir, capsys):
    example = Path(__file__).parent.parent / "deploy" / "example.yaml"
    path = write(workdir, example.read_text())
    assert main(["check-config", str(path)]) == 0
    assert "ok" in capsys.readouterr().out
