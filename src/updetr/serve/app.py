"""The web application (Starlette): the page, its pictures, and three JSON endpoints.

    GET  /                      the page (static/index.html, static/app.js)
    GET  /api/info              models loaded, pictures to choose from, limits
    GET  /api/images/{id}       a picture as JPEG
    POST /api/upload            raw image bytes as the body (no file name is sent or kept) -> the new picture
    POST /api/query             {"image": id, "box": [x, y, w, h], "target": id?} -> answers of the patch models
    POST /api/detect            {"image": id} -> the detector's answer

Every refused request is a JSON ``{"error": message}`` with a 4xx status (400 bad box or JSON, 404 unknown
picture, 413 upload of too many bytes or pixels, 415 not an image); an unexpected failure is a 500 with its message, and the
server keeps serving either way.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .images import MAX_UPLOAD_BYTES, ImageRefused, PictureStore
from .models import BoxError, ServeModels, check_box

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 16 * 1024


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _static(name: str) -> bytes:
    return (files("updetr.serve") / "static" / name).read_bytes()


async def _read_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"{what} of {int(declared)} bytes is larger than the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"{what} is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request) -> dict:
    body = await _read_body(request, MAX_JSON_BYTES, "request")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "the request body must be JSON, e.g. {\"image\": \"astronaut\", \"box\": [x, y, w, h]}") from None
    if not isinstance(value, dict):
        raise Refused(400, "the request body must be a JSON object")
    return value


def create_app(models: ServeModels, pictures: PictureStore, *, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> Starlette:
    """The application serving ``models`` on ``pictures``: the handlers here read them; the page, the script and
    the error handlers (below) need neither."""

    def picture(pid: object, field: str):
        found = pictures.get(pid)
        if found is None:
            raise Refused(404, f"{field} {pid!r}: no such picture (choose one from /api/info, or upload one)")
        return found

    async def info(request: Request) -> Response:
        return JSONResponse({"models": models.describe(), "pictures": pictures.list(), "min_side": models.min_side,
                             "max_upload_bytes": max_upload_bytes, "max_upload_pixels": pictures.max_pixels})

    async def image(request: Request) -> Response:
        found = picture(request.path_params["pid"], "image")
        return Response(found.jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def upload(request: Request) -> Response:
        data = await _read_body(request, max_upload_bytes, "upload")
        try:
            added = await run_in_threadpool(pictures.add_upload, data)
        except ImageRefused as err:
            raise Refused(err.status, str(err)) from None
        return JSONResponse(added.to_dict())

    async def query(request: Request) -> Response:
        body = await _json(request)
        if models.pretrain is None and models.oneshot is None:
            raise Refused(400, "no query-patch model is loaded (start the server with --checkpoint or --oneshot)")
        source = picture(body.get("image"), "image")
        target = picture(body.get("target") or body.get("image"), "target")
        try:
            box = check_box(body.get("box"), source.image.width, source.image.height, models.min_side)
        except BoxError as err:
            raise Refused(400, str(err)) from None
        answers = await run_in_threadpool(models.query, source.image, box, target.image)
        return JSONResponse({"image": source.id, "target": target.id, "box": list(box),
                             "width": target.image.width, "height": target.image.height,
                             "answers": [a.to_dict() for a in answers]})

    async def detect(request: Request) -> Response:
        body = await _json(request)
        if models.detector is None:
            raise Refused(400, "no detector is loaded (start the server with --detector)")
        target = picture(body.get("image"), "image")
        answers = await run_in_threadpool(models.detect, target.image)
        return JSONResponse({"target": target.id, "width": target.image.width, "height": target.image.height,
                             "answers": [a.to_dict() for a in answers]})

    routes = [
        Route("/", _index), Route("/static/app.js", _script), Route("/api/info", info),
        Route("/api/images/{pid}", image), Route("/api/upload", upload, methods=["POST"]),
        Route("/api/query", query, methods=["POST"]), Route("/api/detect", detect, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={Refused: _refused, HTTPException: _http_error, Exception: _failed})


# the routes and error handlers that need neither the models nor the pictures


async def _index(request: Request) -> Response:
    return HTMLResponse(_static("index.html"))


async def _script(request: Request) -> Response:
    return Response(_static("app.js"), media_type="text/javascript")


async def _refused(request: Request, exc: Refused) -> Response:
    log.info("%s %s refused (%d): %s", request.method, request.url.path, exc.status, exc.message)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def _failed(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"the server failed on this request ({type(exc).__name__}: {exc})"}, status_code=500)
