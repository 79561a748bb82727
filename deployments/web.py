"""The web page: `GET /` answers `web/index.html`, `GET /web/{name}` the page's script and style sheet.

Plain files, no build step: the page (`deployments/web/`) submits jobs, follows them by their event stream and draws
each output's waveform and spectrogram in the browser. It holds no data, so it and its files load without an API key
(`is_public`); what it fetches from `v1/...` needs one as any client does. Its URLs are relative, so it works under
a Serve route prefix (hence the redirect to the prefix root's trailing slash).

The files are read once, at import: the allow-list is the folder's listing, so no request path reaches the disk.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

WEB_DIR = Path(__file__).with_name("web")
# A browser asks again each time (`no-cache`) and gets a 304 while the ETag holds: the files change with a deployment.
CACHE_CONTROL = "no-cache"


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


def _load(directory: Path) -> dict[str, StaticFile]:
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            body = path.read_bytes()
            media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if media.startswith("text/") or media in ("application/javascript", "application/json"):
                media += "; charset=utf-8"
            files[path.name] = StaticFile(body, media, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    return files


FILES = _load(WEB_DIR)
PUBLIC_PATHS = frozenset({"/", *(f"/web/{name}" for name in FILES)})  # the page needs no key: it holds no data

router = APIRouter(include_in_schema=False)


def is_public(route: str) -> bool:
    """Whether `route` (the path inside the app) is the page or one of its files, which load without a key. The
    prefix root without its slash ("") is too: it only redirects to "/"."""
    return route in PUBLIC_PATHS or route == ""


def _answer(request: Request, name: str) -> Response:
    file = FILES[name]
    headers = {"ETag": file.etag, "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


@router.get("/")
async def page(request: Request) -> Response:
    # The page's URLs are relative: under a route prefix it must load from "<prefix>/", not "<prefix>".
    if not request.url.path.endswith("/"):
        return RedirectResponse(request.url.replace(path=request.url.path + "/"), status_code=307)
    return _answer(request, "index.html")


@router.get("/web/{name}")
async def web_file(request: Request, name: str) -> Response:
    if name not in FILES:
        return JSONResponse({"detail": f"No such file: web/{name}"}, status_code=404)
    return _answer(request, name)
