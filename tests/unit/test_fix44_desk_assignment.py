"""A verdict sent from a page shown before a desk restart is refused (409, the pair shown again), not recorded with the
restarted desk's Candidate order.

The order is an HMAC under a per-process secret (so no annotator can compute which candidate is the given label).
Before, a page still showing a pair from before a restart, while another page of the same token got the pair from
the restarted desk, sent a verdict the new desk mapped with its own order: inverted half the time, silently.
"""

from __future__ import annotations

import pytest

from synpref.services.desk.core import DeskCore, DeskError, parse_verdict, swapped
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN, PairRecord


def pair(i: int) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": f"question {i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="t",
        )
    )


def test_a_page_from_before_a_restart_is_refused_and_the_pair_shown_again() -> None:
    # Find a pair whose order differs between the two processes' secrets: the case that was inverted.
    before, after = DeskCore(salt=b"a" * 16), DeskCore(salt=b"b" * 16)
    record = next(
        p
        for p in map(pair, range(64))
        if swapped(before.salt, "ann", p.pair.id) != swapped(after.salt, "ann", p.pair.id)
    )
    before.add(record)
    old_view = before.view(before.next_for("ann"), "ann")  # the first tab, before the restart
    picked = 1 + old_view["candidates"].index([{"role": "assistant", "content": record.pair.chosen[0].content}])
    after.add(record)  # the restarted desk reads the pair again
    new_view = after.view(after.next_for("ann"), "ann")  # a second tab of the same token
    assert new_view["assignment"] != old_view["assignment"]
    with pytest.raises(DeskError) as refused:
        after.submit("ann", record.pair.id, picked, "", old_view["assignment"])
    assert refused.value.status == 409
    # The page then shows the pair again, in this desk's order, and the same pick of the chosen text is recorded so.
    again = after.view(after.next_for("ann"), "ann")
    picked = 1 + again["candidates"].index([{"role": "assistant", "content": record.pair.chosen[0].content}])
    decided = after.submit("ann", record.pair.id, picked, "", again["assignment"])
    assert decided is not None and decided.record.human_verdicts[0].preference == PREFERENCE_CHOSEN


def test_the_assignment_is_optional_and_checked_for_type() -> None:
    assert parse_verdict({"pair_id": "p1", "choice": 1})[3] is None  # an older page: as before
    assert parse_verdict({"pair_id": "p1", "choice": 1, "assignment": "ab12"})[3] == "ab12"
    with pytest.raises(DeskError):
        parse_verdict({"pair_id": "p1", "choice": 1, "assignment": 7})
