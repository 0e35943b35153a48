"""What a request's log row says happened: its status, outcome and error, decided in one
place (`settle`, from the middleware, once the request is over) from what the request
path reports: the response it answered, the failure it ended with, a stream's head that
went out, a failure the client was told inside a response.
"""

from __future__ import annotations

from aiohttp import web

from ..errors import ApiError
from ..state import RECORD, STARTED
from ..records import RequestRecord


def tell(request: web.Request, e: ApiError) -> None:
    """`e` reaches the client inside the response (an upstream's error answer passed on as
    it is, or an error event that ended a stream); the first one told is the request's
    outcome. The record holds it from now on: `settle` finishes it without replacing it."""
    rec = request[RECORD]
    if rec.outcome is None:
        rec.outcome, rec.error = e.outcome, e.message


def settle(request: web.Request, rec: RequestRecord, answered: int | None, failure: ApiError | None) -> None:
    """The row's status, outcome and error, once the request is over. `answered`: the
    status of the response the handler returned; `failure`: how the handler ended
    otherwise (an error answered, a disconnect, the proxy's shutdown, a bug).

    A stream whose head went out keeps that status, whatever happened after (a handler that
    returned answered with it); the outcome is the first failure the client was told in a
    response (`tell`), else the one the handler ended with, else what the status says."""
    if failure is not None:
        head = request.get(STARTED)
        rec.finish(failure.status if head is None else head.status, failure.outcome, failure.message)
    elif answered is None:  # ended by no response and no failure we know of
        head = request.get(STARTED)
        rec.finish(500 if head is None else head.status, "error")
    else:
        rec.finish(answered, "ok" if answered < 400 else "rejected")
