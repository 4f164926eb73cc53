"""The fixity audit as a flow: ``diffcolor verify`` on a schedule (the ``verify`` deployment, weekly).

A thin wrapper around :func:`diffcolor.archive.fixity.audit_output`: the audit's
summary and its problems become Prefect artifacts, and the flow run ends
Failed when any record does not hold, so an operator's notification on failed
runs covers the archive's fixity too. With ``repair`` the damaged items are
dropped from the done-index (the next nightly run redoes them) and the report
is written to ``OUTPUT/verify/TIME.json``; without it the audit writes nothing.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, Failed

from diffcolor.archive.fixity import audit_output

SHOWN_PROBLEMS = 1000  # rows of the problems artifact; the JSON report (with repair) holds them all


@flow(name="verify-output", log_prints=True)
def verify_output(output: str, repair: bool = False) -> dict:
    """Audits every item of the collection output ``output``; returns the audit as a dict."""
    logger = get_run_logger()
    audit = audit_output(output, repair=repair, on_problem=lambda problem: logger.warning("%s", problem.line()))
    logger.info("%s", audit.summary())
    rows = [{"item": p.item_id, "file": p.file, "problem": p.problem, "expected": p.expected, "found": p.found}
            for p in audit.problems[:SHOWN_PROBLEMS]]
    if rows:
        create_table_artifact(rows, key="verify-output-problems",
                              description=f"fixity problems in {audit.output} (first {SHOWN_PROBLEMS})")
    lines = [f"### Fixity audit of `{audit.output}`", "", audit.summary()]
    if audit.queued:
        lines += ["", f"Queued for the next run: {', '.join(audit.queued[:50])}"]
    if audit.report:
        lines += ["", f"Report: `{audit.report}`"]
    create_markdown_artifact("\n".join(lines), key="verify-output-summary")
    result = audit.to_dict()
    if not audit.ok:
        return Failed(message=audit.summary(), data=result)
    return Completed(message=audit.summary(), data=result)
