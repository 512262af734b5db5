"""How a push ended, as the CLI's exit code and as a worker job's fate (issue 27: one run lifecycle)."""

from __future__ import annotations

import pytest

from crmsync.cli.exits import for_push
from crmsync.errors import AuthError, CrmsyncError, RetriableError
from crmsync.sync.push import PushSummary
from crmsync.sync.run import Outcome


def _summary(outcome: Outcome, failure: CrmsyncError | None = None) -> PushSummary:
    s = PushSummary(connection="c", provider="hubspot", outcome=outcome, failure=failure)
    s.error = str(failure) if failure else None
    return s


CASES = [
    (Outcome.OK, None, 0, None),
    (Outcome.PARTIAL, None, 1, None),  # per-record failures stay in the outbox: a retry won't fix them
    (Outcome.RETRY_LATER, None, 75, "JobFailed"),
    (Outcome.INTERRUPTED, None, 130, "JobRejected"),
    (Outcome.FAILED, RetriableError("CRM down"), 75, "JobFailed"),
    (Outcome.FAILED, AuthError("token revoked"), 3, "JobRejected"),
]


@pytest.mark.parametrize(("outcome", "failure", "code", "fate"), CASES)
def test_a_push_outcome_has_its_exit_code_and_its_job_fate(
    outcome: Outcome, failure: CrmsyncError | None, code: int, fate: str | None
) -> None:
    from crmsync import worker

    summary = _summary(outcome, failure)
    assert for_push(summary) == code
    if fate is None:
        worker._settle("push c", summary.outcome, summary.failure, summary.error)
    else:
        with pytest.raises(getattr(worker, fate), match="push c"):
            worker._settle("push c", summary.outcome, summary.failure, summary.error)


def test_push_json_summary_keeps_exit_code_after_error_and_names_the_outcome() -> None:
    from crmsync.cli.sync import _push_json

    summary = _summary(Outcome.FAILED, AuthError("token revoked"))
    out = _push_json(summary, for_push(summary))
    keys = list(out)
    assert keys[keys.index("error") + 1] == "exit_code" and out["exit_code"] == 3
    assert out["outcome"] == "failed" and "failure" not in out
