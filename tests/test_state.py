"""The migration state machine (vmem.migration.state): one table, one compare-and-set setter."""
from __future__ import annotations

import pytest

from vmem.migration.state import (
    DESTINATION_TRANSITIONS,
    SOURCE_TRANSITIONS,
    DestinationState,
    IllegalTransition,
    SourceState,
    StateCell,
)

S = SourceState


def test_every_state_has_a_row_and_final_states_go_nowhere():
    assert set(SOURCE_TRANSITIONS) == set(SourceState)
    assert set(DESTINATION_TRANSITIONS) == set(DestinationState)
    for final in (S.COMPLETED, S.ABORTED, S.FAILED):
        assert SOURCE_TRANSITIONS[final] == frozenset()
    # Every state is reachable from SETUP.
    seen, todo = {S.SETUP}, [S.SETUP]
    while todo:
        for nxt in SOURCE_TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(SourceState)


def test_outcomes_are_the_report_strings():
    # docs/report.md: the outcome is one of these; a migration stopped midway reads "failed".
    assert {s.outcome for s in SourceState} == {"completed", "aborted", "failed", "paused"}
    assert S.COMPLETED.outcome == "completed" and S.ABORTED.outcome == "aborted"
    assert S.FAILED.outcome == "failed" and S.POSTCOPY_PAUSED.outcome == "paused"
    assert S.PRECOPY.outcome == "failed" and S.COMMITTED.outcome == "completed"


def test_derived_facts():
    assert [s for s in SourceState if s.switched] == [S.POSTCOPY_ACTIVE, S.POSTCOPY_ENDED, S.POSTCOPY_PAUSED,
                                                       S.POSTCOPY_RECOVER]
    assert not S.POSTCOPY_SWITCH.switched  # the destination guest does not run before TRANSITION
    assert S.ENDED.stream_ended and S.POSTCOPY_ENDED.stream_ended and not S.STOP_AND_COPY.stream_ended
    assert S.COMMITTED.committed and not S.ENDED.committed


def test_the_setter_refuses_an_illegal_transition_and_changes_nothing():
    changes = []
    cell = StateCell(S.SETUP, SOURCE_TRANSITIONS, changes.append)
    cell.set(S.SETUP, S.PRECOPY)
    with pytest.raises(IllegalTransition, match="PRECOPY -> COMPLETED"):
        cell.set(S.PRECOPY, S.COMPLETED)  # skipping the switchover
    with pytest.raises(IllegalTransition, match="expected state SETUP"):
        cell.set(S.SETUP, S.PRECOPY)  # compare-and-set: not in SETUP any more
    assert cell.state is S.PRECOPY and changes == [S.PRECOPY]
    cell.set(S.PRECOPY, S.ABORTED)
    for new in SourceState:
        with pytest.raises(IllegalTransition):
            cell.set(S.ABORTED, new)
    assert cell.state is S.ABORTED


def test_post_copy_recovery_loop_is_legal():
    cell = StateCell(S.SETUP, SOURCE_TRANSITIONS)
    path = [S.POSTCOPY_SWITCH, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED,
            S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE, S.POSTCOPY_ENDED, S.COMMITTED, S.COMPLETED]
    for new in path:
        cell.set(cell.state, new)
    assert cell.state is S.COMPLETED


def test_destination_states_are_its_error_phases():
    assert [d.value for d in DestinationState] == ["setup", "receive", "postcopy", "resume", "verify", "commit"]
    cell = StateCell(DestinationState.SETUP, DESTINATION_TRANSITIONS)
    cell.set(DestinationState.SETUP, DestinationState.RECEIVE)
    with pytest.raises(IllegalTransition):
        cell.set(DestinationState.RECEIVE, DestinationState.COMMIT)
