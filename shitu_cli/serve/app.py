"""The HTTP face of `shitu serve`: FastAPI routes over `Service`, one JSON error shape, limits and a token.

Every refusal is a JSON object {"error", "hint", "status"} with a 4xx status naming the problem;
an unexpected fault is a 500 with the same shape and no traceback (the traceback goes to the log).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from shitu_cli.errors import BadInput, ImageReadError, ShituError
from shitu_cli.serve.service import ServeSettings, Service

LOG = logging.getLogger("shitu.serve")
SETTINGS_ENV = "SHITU_SERVE_SETTINGS"  # how worker processes receive the settings
TOKEN_ENV = "SHITU_TOKEN"
GENERATION_HEADER = "X-Shitu-Generation"


class ApiError(Exception):
    def __init__(self, status: int, message: str, hint: str | None = None):
        super().__init__(message)
        self.status, self.message, self.hint = status, message, hint


def status_of(exc: ShituError) -> int:
    from shitu_cli.data.sources import TooLarge

    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, ImageReadError):
        return 422
    return 400 if isinstance(exc, BadInput) else 500


def create_app(settings: ServeSettings, service: Service | None = None):
    from shitu_cli import __version__
    from shitu_cli.serve.page import PAGE

    service = service or Service(settings)
    limits = settings.limits
    app = FastAPI(title="shitu", version=__version__, docs_url="/docs", redoc_url=None)

    def error_response(status: int, message: str, hint: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "hint": hint, "status": status}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.hint)

    @app.exception_handler(ShituError)
    async def _shitu_error(request: Request, exc: ShituError):
        status = status_of(exc)
        where = f"{exc.path}: " if exc.path is not None else ""
        return error_response(status, f"{where}{exc.message}", exc.hint)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        LOG.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({exc.__class__.__name__}); see the server log")

    def require_token(request: Request, editing: bool) -> None:
        if not settings.token or not (editing or settings.read_token):
            return
        given = request.headers.get("X-Shitu-Token") or request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not given or not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise ApiError(401, "this server asks for a token" if not given else "wrong token",
                           hint="send it as `Authorization: Bearer TOKEN` or `X-Shitu-Token: TOKEN`")

    def check_length(request: Request, limit: int) -> None:
        declared = request.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {int(declared):,} bytes, over the {limit:,} byte limit")

    async def in_thread(work: Callable[[], Any], what: str) -> Any:
        from starlette.concurrency import run_in_threadpool

        try:
            return await asyncio.wait_for(run_in_threadpool(work), timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"{what} took over {limits.request_timeout_s:g} s", hint=None if what == "recognition"
                           else "the edit keeps running and may still commit: GET /gallery shows the index") from None

    async def read_files(request: Request, field: str) -> tuple[list[tuple[str, bytes]], Any]:
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(415, f"expected a multipart/form-data upload with a `{field}` part, got {content_type or 'no body'}")
        try:
            form = await request.form(max_files=limits.max_files_per_add, max_fields=20)
        except HTTPException as exc:
            raise ApiError(400, f"bad multipart body ({exc.detail})") from None
        files = []
        for part in form.getlist(field):
            if isinstance(part, str):
                raise ApiError(400, f"`{field}` must be a file part, not a text field")
            data = await part.read(limits.max_upload_bytes + 1)
            if len(data) > limits.max_upload_bytes:
                raise ApiError(413, f"{part.filename}: over the {limits.max_upload_bytes:,} byte upload limit")
            files.append((part.filename or "upload", data))
        return files, form

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/version")
    async def version():
        from shitu_cli.recipes import package_versions

        return package_versions(extra=("fastapi", "uvicorn"))

    @app.post("/recognise")
    async def recognise(request: Request):
        """An image as a multipart `file` part, or JSON {"url": "http(s)://..."}: predict --json's document."""
        from shitu_cli.data.sources import decode_image_bytes, fetch_url

        require_token(request, editing=False)
        check_length(request, limits.max_upload_bytes)
        if request.headers.get("Content-Type", "").startswith("application/json"):
            url = await _json_field(request, "url")
            if not settings.allow_urls:
                raise ApiError(403, "this server does not fetch URLs", hint="upload the image as a `file` part")
            name = url
            data = await in_thread(lambda: fetch_url(url, limits.max_upload_bytes, limits.url_timeout_s), "fetching the URL")
        else:
            files, _ = await read_files(request, "file")
            if len(files) != 1:
                raise ApiError(400, f"send exactly one `file` part, got {len(files)}")
            name, data = files[0]
        document, generation = await in_thread(
            lambda: service.recognise(decode_image_bytes(data, name, limits.max_pixels), name), "recognition")
        from shitu_cli.render import _jsonable

        return JSONResponse(_jsonable(document), headers={GENERATION_HEADER: str(generation)})

    @app.get("/gallery")
    async def gallery(request: Request):
        require_token(request, editing=False)
        return service.gallery()

    @app.post("/gallery/add")
    async def gallery_add(request: Request):
        """Multipart: `label`, one or more `file` parts, optional `box` "x1,y1,x2,y2" to add that crop of each."""
        require_token(request, editing=True)
        check_length(request, limits.max_upload_bytes)
        files, form = await read_files(request, "file")
        label = form.get("label")
        if not isinstance(label, str) or not label.strip():
            raise ApiError(400, "no `label` given", hint="send the label as a text field of the form")
        box = _parse_box(form.get("box"))
        return _jsonable_response(await in_thread(lambda: service.add(files, label, box), "adding to the gallery"))

    @app.post("/gallery/remove")
    async def gallery_remove(request: Request):
        """JSON: {"label": ...} or {"ids": [...]} or {"paths": [...]}."""
        require_token(request, editing=True)
        body = await _json_body(request)
        unknown = set(body) - {"label", "ids", "paths"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}", hint="send one of: label, ids, paths")
        return _jsonable_response(await in_thread(
            lambda: service.remove(body.get("label"), body.get("ids"), body.get("paths")), "removing from the gallery"))

    @app.post("/gallery/sync")
    async def gallery_sync(request: Request):
        require_token(request, editing=True)
        return _jsonable_response(await in_thread(service.sync, "syncing the gallery"))

    app.state.service = service
    return app


def _jsonable_response(document: dict[str, Any]):
    from shitu_cli.render import _jsonable

    return JSONResponse(_jsonable(document), headers={GENERATION_HEADER: str(document.get("generation", ""))})


async def _json_body(request) -> dict[str, Any]:
    import json

    try:
        body = json.loads(await request.body() or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


async def _json_field(request, name: str) -> str:
    body = await _json_body(request)
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"JSON body has no `{name}` string")
    return value


def _parse_box(text: Any) -> list[float] | None:
    if text is None or text == "":
        return None
    try:
        values = [float(v) for v in str(text).replace(" ", "").split(",")]
    except ValueError:
        raise ApiError(400, f"box {text!r} is not 4 numbers x1,y1,x2,y2") from None
    if len(values) != 4:
        raise ApiError(400, f"box {text!r} is not 4 numbers x1,y1,x2,y2")
    return values


def app_from_env():
    """uvicorn's factory in each worker process: the settings come in SHITU_SERVE_SETTINGS."""
    return create_app(ServeSettings.from_json(os.environ[SETTINGS_ENV]))
