"""Errors as JSON ``{error, message, param}``, one handler per error class (the most specific wins).

- request validation (FastAPI/pydantic): 422 ``invalid_request``, a parameter outside its declared
  range or pattern;
- :class:`~vectorgeo.errors.RequestError`: 422 ``invalid_request``, a parameter that the checks of
  :mod:`vectorgeo.validation` refuse (e.g. 15 hex digits that are no H3 cell);
- :class:`NotFound`: 404 ``not_found``, the cell asked for is not loaded;
- :class:`~vectorgeo.errors.QueryTimeout`: 503 ``timeout``, a query ran longer than the statement
  timeout (``serve.statement_timeout_s``) and the database cancelled it;
- :class:`~vectorgeo.errors.DatabaseError`: 503 ``unavailable``, the database is unreachable, the
  connection was lost, every connection is busy, or nothing is loaded. A 503 carries ``Retry-After``
  and only the error's short message: the driver's text goes to the log, never to the client;
- a request body larger than ``serve.max_body_bytes``: 413 ``too_large`` (:mod:`.limits`);
- :class:`~vectorgeo.errors.DataError` and other :class:`~vectorgeo.errors.VectorgeoError`: 500
  ``internal`` with their message, a server misconfiguration (e.g. a missing data package);
- Starlette's HTTP errors (unknown route, method): their status;
- anything else: 500 ``internal``, logged with its traceback; the answer names only its type.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vectorgeo.errors import DatabaseError, DataError, QueryTimeout, RequestError, VectorgeoError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
"""Seconds a 503 answer asks the client to wait before trying again (``Retry-After``)."""

PATTERN_HINTS = {
    "h3": "expected an H3 cell as 15 hex digits",
    "bbox": "expected four comma-separated numbers west,south,east,north (degrees)",
}


class NotFound(Exception):
    """The cell a request names (or the one at its point) is not loaded.

    Attributes:
        param: The parameter that named it.
    """

    def __init__(self, param: str | None, message: str) -> None:
        self.param = param
        super().__init__(message)


def error_response(status: int, error: str, message: str, param: str | None = None) -> JSONResponse:
    """The JSON error body every failing request gets."""
    return JSONResponse(status_code=status, content={"error": error, "message": message, "param": param})


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errs = exc.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ()) if isinstance(p, str)]
    if first.get("type") == "json_invalid" or loc == ["body"] or not loc:
        param = "body"
        message = f"request body: {first.get('msg', 'invalid')} (expected a JSON object)"
    else:
        param = loc[-1] if loc[0] in ("query", "path", "body") and len(loc) > 1 else ".".join(loc)
        hint = PATTERN_HINTS.get(param) if first.get("type") == "string_pattern_mismatch" else None
        message = f"parameter '{param}': {hint or first.get('msg', 'invalid value')}"
    return error_response(422, "invalid_request", message, param)


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestError)
    return error_response(422, "invalid_request", str(exc), exc.param)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFound)
    return error_response(404, "not_found", str(exc), exc.param)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DatabaseError)
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    kind = "timeout" if isinstance(exc, QueryTimeout) else "unavailable"
    resp = error_response(503, kind, exc.message)
    resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    return resp


async def _server_data(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s: %s", request.url.path, exc)
    return error_response(500, "internal", str(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # the body is not even text (Starlette's parser gave up)
        return error_response(422, "invalid_request", f"request body: {exc.detail} (expected a JSON object)", "body")
    kinds = {404: "not_found", 405: "method_not_allowed"}
    resp = error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail))
    resp.headers.update(exc.headers or {})
    return resp


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s", request.url.path)
    return error_response(500, "internal", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers of the table above (the most specific class wins)."""
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(RequestError, _bad_request)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(DatabaseError, _unavailable)
    app.add_exception_handler(DataError, _server_data)
    app.add_exception_handler(VectorgeoError, _server_data)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
