"""`mmcl serve INDEX`: a search page and a JSON API over an index folder (FastAPI + uvicorn: `mmcl[serve]`).

    GET  /                         the page (mmcl/search/static/index.html)
    GET  /search?text=...&k=10&to=image|text     text -> images or captions
    POST /search/image?k=10&to=image|text        body: the image bytes, Content-Type image/jpeg|png|webp|gif|bmp
    GET  /image/{image_id}         an indexed image, read from its shard at its byte offset (nothing unpacked)
    GET  /api/info                 sizes, model, limits

Every bad request gets a 4xx answer with {"detail": "one line saying what is wrong"}: k outside 1..MAX_K,
an empty or over-long query, an unknown target, a body that is not an accepted image type (415), too large
(413) or does not decode (400), an unknown image id (404). Anything unexpected is a 500 with a message; the
server keeps running. It listens on the loopback interface unless --host says otherwise.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request, Query)
# as objects, and they are imported inside create_app so that this module loads without FastAPI.
import sys
import threading
from pathlib import Path

from mmcl.search.query import MAX_QUERY_CHARS, Searcher

MAX_K = 100
MAX_UPLOAD_BYTES = 8 * 2**20
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp")
STATIC = Path(__file__).resolve().parent / "static"


def _fastapi():
    try:
        import fastapi
        import uvicorn
    except ImportError:
        raise ValueError("mmcl serve needs FastAPI and uvicorn: pip install 'mmcl[serve]'") from None
    return fastapi, uvicorn


def _with_urls(results):
    return [dict(r, image_url=f"/image/{r['image_id']}") for r in results]


def _add_handlers(app, fastapi) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request, exc):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid value')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


async def _read_upload(request, fastapi) -> bytes:
    """The request body, refused when it is not an accepted image type or larger than MAX_UPLOAD_BYTES."""
    HTTPException = fastapi.HTTPException
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in IMAGE_TYPES:
        raise HTTPException(415, f"Content-Type {kind or '(none)'} is not accepted: send one of "
                                 f"{', '.join(IMAGE_TYPES)}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"upload of {declared} bytes is larger than {MAX_UPLOAD_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes")
    if not body:
        raise HTTPException(400, "empty upload: send the image bytes as the request body")
    return bytes(body)


def create_app(searcher: Searcher):
    """The FastAPI application over a loaded Searcher."""
    fastapi, _ = _fastapi()
    from fastapi import HTTPException, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, Response

    app = fastapi.FastAPI(title="mmcl search", docs_url=None, redoc_url=None, openapi_url=None)
    _add_handlers(app, fastapi)
    lock = threading.Lock()  # one query at a time through the model
    k_query, to_query = Query(10, ge=1, le=MAX_K), Query("image", pattern="^(image|text)$")

    def run(function, *args):
        with lock:
            try:
                return function(*args)
            except ValueError as err:  # the query itself is bad (empty, does not decode, ...)
                raise HTTPException(400, str(err)) from None

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/info")
    def info():
        return {"images": searcher.info["images"], "captions": searcher.info["captions"],
                "model": searcher.model_spec, "targets": sorted(searcher.indexes), "max_k": MAX_K,
                "max_upload_bytes": MAX_UPLOAD_BYTES, "image_types": list(IMAGE_TYPES)}

    @app.get("/search")
    def search(text: str = Query(..., max_length=MAX_QUERY_CHARS), k: int = k_query, to: str = to_query):
        return {"query": text, "k": k, "to": to, "results": _with_urls(run(searcher.text_search, text, k, to))}

    @app.post("/search/image")
    async def search_image(request: Request, k: int = k_query, to: str = to_query):
        data = await _read_upload(request, fastapi)
        results = await run_in_threadpool(run, searcher.image_search, data, k, to, "the uploaded file")
        return {"query": "(image)", "k": k, "to": to, "results": _with_urls(results)}

    @app.get("/image/{image_id}")
    def image(image_id: int):
        try:
            data, kind = searcher.image_bytes(image_id)
        except KeyError as err:
            raise HTTPException(404, str(err.args[0])) from None
        except (OSError, ValueError) as err:
            raise HTTPException(404, f"image {image_id} cannot be read from its shard: {err}") from None
        return Response(data, media_type=kind, headers={"Cache-Control": "max-age=3600"})

    return app


def run_serve(args) -> int:
    """`mmcl serve` handler: load the index and the model once, then serve until interrupted."""
    _, uvicorn = _fastapi()
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    searcher = Searcher(args.index, args.model, args.device or "cpu")
    app = create_app(searcher)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mmcl: serving on {args.host}: reachable from other machines", file=sys.stderr)
    print(f"mmcl: serving {args.index} ({searcher.info['images']} images) at http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
