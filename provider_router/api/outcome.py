"""What a request's log row says happened: its status, outcome and error, decided in one
place (`settle`, from the middleware, once the request is over) from what the request
path reports: the response it answered, the failure it ended with, a stream's head that
went out, a failure the client was told inside a response.
"""

from __future__ import annotations

from aiohttp import web

from ..errors import ApiError
from ..state import STARTED
from ..records import RequestRecord

# A failure the client was told inside a response rather than by one: an upstream's error
# answer passed on as it is, or an error event that ended a stream.
TOLD = web.RequestKey("told", ApiError)


def tell(request: web.Request, e: ApiError) -> None:
    """`e` reaches the client inside the response; the first one told is the request's outcome."""
    if TOLD not in request:
        request[TOLD] = e


def settle(request: web.Request, rec: RequestRecord, answered: int | None, failure: ApiError | None) -> None:
    """The row's status, outcome and error, once the request is over. `answered`: the
    status of the response the handler returned; `failure`: how the handler ended
    otherwise (an error answered, a disconnect, the proxy's shutdown, a bug).

    A stream whose head went out keeps that status, whatever happened after; the outcome is
    the first failure the client was told in a response, else the one the handler ended
    with, else what the status says."""
    head = request.get(STARTED)
    cause = request.get(TOLD) or failure
    if head is not None:
        status = head.status
    elif failure is not None:
        status = failure.status
    else:
        status = 500 if answered is None else answered
    if cause is not None:
        rec.finish(status, cause.outcome, cause.message)
    elif answered is None:  # ended by no response and no failure we know of
        rec.finish(status, "error")
    else:
        rec.finish(status, "ok" if status < 400 else "rejected")
