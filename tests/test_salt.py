import pytest

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
