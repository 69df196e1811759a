"""Connection admission per uid: root's reserve, the per-uid cap, the quick lane."""

from __future__ import annotations

import pytest

from gpuguard.control.limits import Admission, Lane, Limits

USER, OTHER = 1000, 1001


def test_one_uid_cannot_take_every_slot() -> None:
    admission = Admission(Limits(total=8, per_uid=3, root_reserved=2, quick=2, quick_per_uid=1))
    assert [admission.admit(USER) for _ in range(5)] == [Lane.FULL] * 3 + [Lane.QUICK, None]
    assert [admission.admit(OTHER) for _ in range(3)] == [Lane.FULL] * 3
    assert admission.admit(OTHER) == Lane.QUICK  # the last quick slot
    assert admission.admit(1002) is None  # 6 of 8 full slots taken: the other 2 are root's
    assert [admission.admit(0) for _ in range(2)] == [Lane.FULL] * 2
    assert admission.admit(0) is None  # every lane full


def test_root_may_use_every_full_slot() -> None:
    admission = Admission(Limits(total=4, per_uid=1, root_reserved=1, quick=0, quick_per_uid=0))
    assert [admission.admit(0) for _ in range(5)] == [Lane.FULL] * 4 + [None]
    assert admission.admit(USER) is None


def test_release_frees_the_slot_of_its_lane() -> None:
    admission = Admission(Limits(total=1, per_uid=1, root_reserved=0, quick=1, quick_per_uid=1))
    assert (admission.admit(USER), admission.admit(USER), admission.admit(USER)) == (Lane.FULL, Lane.QUICK, None)
    admission.release(USER, Lane.QUICK)
    assert admission.admit(OTHER) == Lane.QUICK
    admission.release(USER, Lane.FULL)
    assert admission.admit(USER) == Lane.FULL


@pytest.mark.parametrize("bad", [{"root_reserved": 65}, {"root_reserved": -1}, {"per_uid": -1}, {"quick_timeout_s": 0}])
def test_inconsistent_limits_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)  # type: ignore[arg-type]
