"""The curator's review application: browse, compare, recolour, approve (``diffcolor review OUTPUT``).

Pages and a JSON API under ``/api/`` (FastAPI's OpenAPI page at ``/docs``)
over one output root, read through :mod:`diffcolor.archive` only: the
collection table (:mod:`diffcolor.archive.browse`), each item's records
(:class:`diffcolor.archive.layout.ItemLayout`) and decisions
(:mod:`diffcolor.archive.decisions`). Recolouring starts the reprocess flow
(:mod:`review.jobs`).

Safety:

- the server answers only the host names it was started for (loopback names,
  ``host``, ``allowed_hosts``): any other ``Host`` is refused before a route
  runs (:mod:`review.guard`), so a page that rebinds its own DNS name to this
  address reads nothing; request bodies over 1 MiB are refused (413);
- every item id goes through the item-id rule, and every file served is
  derived from it and a version number, never from a path in a request; every
  path goes through :func:`diffcolor.archive.storage.confine`, so a symbolic
  link never makes the server read or write outside the output;
- a server token (``--token-file``, else a random one in a private file whose
  path is printed; the token itself is never printed or put in a URL): state
  changes need it. A script sends it as ``Authorization: Bearer`` and needs
  nothing more (a browser never adds that header to a cross-site request). A
  browser signs in with the form at ``/login`` (POST), which sets an HttpOnly,
  SameSite=Strict cookie; changes by cookie also need the ``X-CSRF-Token``
  header with the CSRF value the pages carry (a custom header that a foreign
  page cannot send without a CORS preflight, which this server never grants),
  and any change whose ``Origin`` is not one of this server's allowed origins
  (scheme, host and port, from the allow-list, never from the request's
  ``Host``) is refused;
- off loopback every request needs the token, reads included; on loopback
  reads are open, ``check`` included (it changes nothing, and its input is
  bounded: prompt characters and words, colour-map entries, before any
  tokenizer work);
- ``read_only`` refuses every change;
- pages load nothing from elsewhere: inline CSS and JS, images from this server.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import io
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from PIL import Image
from pydantic import AliasChoices, BaseModel, Field, StringConstraints, field_validator

from diffcolor.archive import storage
from diffcolor.archive.browse import CollectionTable, Filters, StillIndexing, metrics
from diffcolor.archive.decisions import (
    DECISIONS,
    MAX_NAME_CHARS,
    MAX_NOTE_CHARS,
    DecisionError,
    item_layout,
    publish_review_run,
    read_approved,
    read_decisions,
    record_decision,
    version_output,
)
from diffcolor.archive.pages import render_page
from diffcolor.common import record as declarations
from diffcolor.common.captions import (
    PromptLimit,
    RewrittenCaption,
    describe_color_map,
    prompt_length_problems,
    prompt_slots,
    rewrite_caption,
)
from diffcolor.common.errors import DiffColorError, PromptError
from diffcolor.common.ids import UnsafeItemIdError, normalize_item_id
from review.guard import MAX_BODY_BYTES, BodyLimit, HostGuard, allowed_names, allowed_origins, origin_key
from review.jobs import Jobs

COOKIE = "diffcolor_review"
THUMBNAIL_SIDE = 192
PAGE_SIZE = 48
INDEX_WAIT_SECONDS = 5.0  # ours: how long a filtered page waits for a collection state being built
# Fields of a version record the pages show; never model_prompt or rewritten_caption (identifier tokens).
SHOWN_FIELDS = ("version", "status", "created_at", "caption", "target_prompt", "color_map", "prompt_alignment",
                "prompt_warning", "seed", "preset", "alpha", "finetune_steps_run", "smoke_run")
PROVENANCE_FIELDS = ("model_id", "clip_model_id", "model_hash", "weight_dtype", "software", "software_version",
                     "source_sha256", "output_sha256", "cache_key", "seconds")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Bounds on a recolour target (ours), checked before any tokenizer work: CLIP reads 77 tokens, so a longer
# prompt is never rendered as written; a caption has a few dozen content words at most.
MAX_PROMPT_CHARS = 600
MAX_PROMPT_WORDS = 80
MAX_COLOUR_MAP_ENTRIES = 40
MAX_WORD_CHARS = 40
_Word = Annotated[str, StringConstraints(max_length=MAX_WORD_CHARS)]


@dataclass
class ReviewConfig:
    """What one review server serves and allows."""

    output: str  # the output root (path or URI)
    token: str  # the server token (state changes; every request off loopback)
    read_only: bool = False
    host: str = "127.0.0.1"
    reprocess_options: dict = field(default_factory=dict)  # ReprocessOptions fields for recolour jobs
    port: int | None = None  # the port served on (the Origin check); None: the scheme's default
    allowed_hosts: tuple[str, ...] = ()  # host names answered besides the loopback names and ``host``

    @property
    def csrf(self) -> str:
        return hmac.new(self.token.encode(), b"diffcolor-review-csrf", hashlib.sha256).hexdigest()


class ColorRequest(BaseModel):
    """A new target for one item: a colour map of caption words, or a target prompt."""

    item_id: str = Field(max_length=400)
    color_map: dict[_Word, _Word] | None = Field(None, max_length=MAX_COLOUR_MAP_ENTRIES,
                                                 validation_alias=AliasChoices("color_map", "colour_map"))
    target_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)

    @field_validator("target_prompt")
    @classmethod
    def _few_words(cls, prompt: str | None) -> str | None:
        if prompt is not None and len(prompt.split()) > MAX_PROMPT_WORDS:
            raise ValueError(f"a target prompt has at most {MAX_PROMPT_WORDS} words")
        return prompt


class RecolorRequest(BaseModel):
    targets: list[ColorRequest] = Field(min_length=1, max_length=500)


class DecisionRequest(BaseModel):
    version: int = Field(ge=1)
    decision: str = Field(description="approved or rejected", max_length=20)
    decided_by: str = Field(description="the curator's name", max_length=MAX_NAME_CHARS)
    note: str = Field("", max_length=MAX_NOTE_CHARS)


def _bound(raw: str | None, name: str) -> float | None:
    """A metric filter's bound: None when empty; a finite number, else HTTP 400 naming the parameter."""
    if raw is None or not str(raw).strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise HTTPException(400, f"{name} must be a finite number, got {str(raw)[:40]!r}")
    return value


def metric_ranges_dependency():
    """The metric filters ``min_METRIC`` / ``max_METRIC`` as ``(metric, min, max)`` (a FastAPI dependency).

    Its signature is generated from the filterable metrics the record declares
    (:mod:`diffcolor.common.record`), so every bound is a declared query
    parameter: /openapi.json lists them, and an unknown one is never silently read.
    """
    filtered = declarations.filterable()

    def metric_ranges(**bounds: str | None) -> tuple[tuple[str, float | None, float | None], ...]:
        ranges = []
        for declared in filtered:
            metric = declared.name
            low, high = (_bound(bounds.get(f"{side}_{metric}"), f"{side}_{metric}") for side in ("min", "max"))
            if low is not None or high is not None:
                ranges.append((metric, low, high))
        return tuple(ranges)

    metric_ranges.__signature__ = inspect.Signature([
        # read as text, so an empty form field means "no bound"; the schema says what a bound is: a number
        inspect.Parameter(f"{side}_{declared.name}", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=Query(None, json_schema_extra={"type": "number"},
                                        description=f"only items whose {declared.name} is "
                                                    f"{'at least' if side == 'min' else 'at most'} this number: "
                                                    f"{declared.describe()}"))
        for declared in filtered for side in ("min", "max")])
    return metric_ranges


def _item_id(raw: str) -> str:
    try:
        return normalize_item_id(raw)
    except UnsafeItemIdError as error:
        raise HTTPException(400, str(error)) from None


def _public(record: dict) -> dict:
    shown = {name: record.get(name) for name in SHOWN_FIELDS}
    shown["metrics"] = {declared.name: record.get(declared.name) for declared in declarations.metrics()
                        if record.get(declared.name) is not None}
    shown["provenance"] = {name: record.get(name) for name in PROVENANCE_FIELDS if record.get(name)}
    return shown


@lru_cache(maxsize=8)
def _tokenizer(model_id: str):
    """The text tokenizer of the model an item was made with (None when it is not on this machine)."""
    try:
        from transformers import CLIPTokenizer

        from diffcolor.method.model_names import resolve_model
        from diffcolor.method.models import resolve_folder

        folder = resolve_folder(resolve_model(model_id), revision=None, allow_download=False,
                                what="Stable Diffusion model", check="tokenizer")
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except Exception:  # no model here: the render itself checks, and the page shows its error
        return None


def _multi_token(record: dict, colours: dict[str, str]) -> str | None:
    """Why a colour cannot go into an identifier slot (more than one token for the item's model), or None."""
    tokenizer = _tokenizer(str(record.get("model_id") or ""))
    if tokenizer is None:
        return None
    for word, colour in colours.items():
        count = len(tokenizer(colour, add_special_tokens=False).input_ids)
        if count != 1:
            return (f"the colour {colour!r} for {word!r} is {count} tokens for this item's model; "
                    "give a one-word colour the model knows (e.g. 'red', not 'light red')")
    return None


def _rewritten(record: dict) -> RewrittenCaption:
    """The item's ``c'`` as its state was fitted with (the record's), else the caption rewritten now."""
    caption, stored = record.get("caption") or "", record.get("rewritten_caption")
    return RewrittenCaption.stored(caption, stored) if stored else rewrite_caption(caption)


def check_target(record: dict, color_map: dict | None, target_prompt: str | None) -> dict:
    """Whether a new target suits the item: ``{"ok", "problem", "described", "warning"}``.

    A colour map must name content words of the caption (the method's token
    rules, :mod:`diffcolor.common.captions`) with colours that are one token
    for the item's model (its tokenizer, when the model is on this machine); a
    free prompt is accepted, with a warning when it cannot be aligned with the
    caption word by word.
    """
    caption = record.get("caption") or ""
    color_map = {key: value for key, value in (color_map or {}).items() if (value or "").strip()}
    target_prompt = (target_prompt or "").strip() or None
    if not color_map and not target_prompt:
        return {"ok": False, "problem": "give a colour for at least one word, or a target prompt"}
    if color_map and target_prompt:
        return {"ok": False, "problem": "give a colour map or a target prompt, not both"}
    try:
        rewritten = _rewritten(record)
        tokenizer = _tokenizer(str(record.get("model_id") or ""))  # the model's prompt must fit its text encoder
        too_long = [] if tokenizer is None else prompt_length_problems(
            PromptLimit(tokenizer.tokenize, tokenizer.model_max_length - 2, tokenizer.model_max_length), rewritten,
            color_map, [target_prompt] if target_prompt else [])
        if too_long:
            return {"ok": False, "problem": too_long[0][1]}
        if color_map:
            described = describe_color_map(rewritten, color_map)
            problem = _multi_token(record, color_map)
            if problem:
                return {"ok": False, "problem": problem}
            return {"ok": True, "described": described, "color_map": color_map}
        try:
            slots = prompt_slots(rewritten, target_prompt)
            reason = _multi_token(record, {rewritten.slots[slot]: colour for slot, colour in slots.items()})
            warning = None if reason is None else f"the prompt will be rendered as written, not aligned: {reason}"
        except PromptError as error:
            warning = f"the prompt cannot be aligned with the caption word by word: {error}"
        return {"ok": True, "described": target_prompt, "warning": warning, "target_prompt": target_prompt}
    except PromptError as error:
        return {"ok": False, "problem": str(error)}


@lru_cache(maxsize=512)
def _picture(uri: str, kind: str, side: int | None) -> bytes:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
        picture = image.convert("RGB")
    if side:
        picture.thumbnail((side, side))
    if kind == "gray":  # the derivative keeps the source's L*: its luminance is the gray original
        picture = picture.convert("L")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def create_app(config: ReviewConfig, jobs: Jobs | None = None) -> FastAPI:
    """The review application for ``config`` (``jobs``: where recolour jobs start; a default :class:`Jobs`)."""
    app = FastAPI(title="DiffColor Archive review", version="1",
                  description="Browse a collection's colourisations, compare versions, recolour, approve.")
    table = CollectionTable(storage.absolute(config.output))
    output = table.output
    jobs = jobs or Jobs(output, config.reprocess_options)
    app.state.config, app.state.table, app.state.jobs = config, table, jobs
    metric_ranges = metric_ranges_dependency()  # the query parameters of the declared metric filters
    open_reads = config.host in LOOPBACK
    origins = allowed_origins(config.host, config.port, config.allowed_hosts)
    # Outermost last: the Host is checked first, then the body's size, then the routes run.
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(HostGuard, names=allowed_names(config.host, config.allowed_hosts))

    # 1. Who may do what.
    def signed_in_by(request: Request) -> str | None:
        """"bearer" or "cookie" when the request carries the server's token that way, else None.

        An Authorization header decides alone: a wrong bearer token is not rescued by a cookie.
        """
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, given = header.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), config.token.encode())
            return "bearer" if ok else None
        given = request.cookies.get(COOKIE) or ""
        return "cookie" if given and hmac.compare_digest(given.encode(), config.token.encode()) else None

    def authenticated(request: Request) -> bool:
        return signed_in_by(request) is not None

    def same_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin_key(origin) not in origins:
            raise HTTPException(403, f"requests from the origin {origin[:100]!r} are refused")

    def may_read(request: Request) -> None:
        if not open_reads and not authenticated(request):
            raise HTTPException(401, "this server needs its token: sign in at /login, or send Authorization: Bearer")

    def may_change(request: Request) -> None:
        if config.read_only:
            raise HTTPException(403, "this review server is read-only")
        how = signed_in_by(request)
        if how is None:
            raise HTTPException(401, "changes need the server's token (Authorization: Bearer, or sign in at /login)")
        same_origin(request)
        # CSRF defends cookie sessions only: a browser never adds an Authorization header on its own.
        if how == "cookie" and not hmac.compare_digest(request.headers.get("x-csrf-token", "").encode(),
                                                       config.csrf.encode()):
            raise HTTPException(403, "missing or wrong X-CSRF-Token header")

    def page_context(request: Request) -> dict:
        can_change = authenticated(request) and not config.read_only
        return {"csrf": config.csrf if can_change else "", "read_only": config.read_only,
                "signed_in": authenticated(request), "output": storage.absolute(config.output)}

    @app.exception_handler(DiffColorError)
    async def _diffcolor_error(request: Request, error: DiffColorError):
        status = 400 if isinstance(error, (UnsafeItemIdError, PromptError, DecisionError)) else 500
        if isinstance(error, storage.OutsideRootError):
            status = 403
        return JSONResponse({"detail": str(error)}, status_code=status)

    # 2. What the pages show, as data.
    def inside(uri: str) -> str:
        return storage.confine(output, uri)

    def item_data(item_id: str) -> dict:
        layout = item_layout(output, item_id)
        versions = [storage.read_json(inside(uri)) for uri in layout.version_records()]
        latest = storage.read_json(layout.result) if storage.exists(inside(layout.result)) else None
        if latest is None and not versions:
            raise HTTPException(404, f"item {item_id!r} is not in this output")
        record = latest or versions[-1]
        done = [version for version in versions if version.get("status") == "done"]
        try:
            slots = list(dict.fromkeys(_rewritten(record).slots))
        except PromptError:
            slots = []
        has_state = storage.exists(inside(layout.state_object))
        # a failed attempt after the current version (a later run), noted beside it: attempts/ names sort by time
        attempts = sorted(storage.list_files(inside(layout.attempts))) if storage.exists(inside(layout.attempts)) \
            else []
        failure = storage.read_json(inside(attempts[-1])) if attempts and record.get("status") == "done" else None
        if failure is not None and str(failure.get("created_at") or "") <= str(record.get("created_at") or ""):
            failure = None
        return {
            "item_id": item_id, "status": record.get("status"), "caption": record.get("caption"),
            "error_message": record.get("error_message") if record.get("status") != "done" else None,
            "catalogue": record.get("catalogue") or {}, "current_version": record.get("version"),
            "versions": [_public(version) for version in done],
            "has_color_state": has_state, "recolor_mode": "render" if has_state else "full_fit",
            "color_words": slots, "colour_words": slots,  # the second: the former spelling, for existing clients
            "decisions": read_decisions(output, item_id),
            "approved": read_approved(output, item_id),
            "later_failure": None if failure is None else {"created_at": failure.get("created_at"),
                                                           "error_message": failure.get("error_message")},
            "metric_explanations": declarations.explanations(),
        }

    def latest_record(item_id: str) -> dict:
        layout = item_layout(output, item_id)
        if not storage.exists(inside(layout.result)):
            raise HTTPException(404, f"item {item_id!r} is not in this output")
        return storage.read_json(layout.result)

    def filters_of(status, collection, q, smoke, decision, ranges) -> Filters:
        if decision not in (None, "", "none", *DECISIONS):
            raise HTTPException(400, f"decision must be one of none, {', '.join(DECISIONS)}")
        return Filters(status=status or None, collection=collection or None, text=q or None,
                       smoke=None if smoke in (None, "") else smoke == "true", decision=decision or None,
                       ranges=tuple(ranges))

    # 3. The JSON API.
    @app.get("/api/items", dependencies=[Depends(may_read)], summary="List items (filtered, paged)")
    def list_items(status: str | None = None, collection: str | None = None,
                   q: str | None = Query(None, description="text in the item id, caption or catalogue fields"),
                   smoke: str | None = Query(None, description="true or false"),
                   decision: str | None = Query(None, description="approved, rejected or none"),
                   offset: int = Query(0, ge=0), limit: int = Query(PAGE_SIZE, ge=1, le=500),
                   ranges: tuple = Depends(metric_ranges)) -> dict:
        """Items with their current state; metric ranges as ``min_METRIC`` / ``max_METRIC`` query parameters.
        ``building``: the collection is still being indexed (the unfiltered list is read from the runs meanwhile);
        a filtered list that cannot wait for it has ``total`` null and no items (``indexing_error``: why the
        indexing failed, if it did)."""
        filters = filters_of(status, collection, q, smoke, decision, ranges)
        try:
            listing = table.page(filters, offset, limit, wait=INDEX_WAIT_SECONDS)
        except StillIndexing as indexing:
            return {"total": None, "offset": offset, "limit": limit, "items": [], "building": True,
                    "indexing_error": indexing.error}
        total, rows = listing
        return {"total": total, "offset": offset, "limit": limit, "items": rows, "building": listing.building}

    @app.get("/api/items/{item_id}", dependencies=[Depends(may_read)], summary="One item: versions, decisions")
    def get_item(item_id: str) -> dict:
        return item_data(_item_id(item_id))

    @app.get("/api/items/{item_id}/versions/{version}/image", dependencies=[Depends(may_read)],
             summary="A version's access copy (colour) or its gray original, full or thumbnail",
             response_class=Response)
    def version_image(item_id: str, version: int, kind: str = Query("color", pattern="^(color|colour|gray)$"),
                      size: str = Query("full", pattern="^(full|thumb)$")) -> Response:
        layout = item_layout(output, _item_id(item_id))
        record_uri = inside(layout.record(version))
        if version < 1 or not storage.exists(record_uri):
            raise HTTPException(404, f"item {item_id!r} has no version {version}")
        access = version_output(layout, storage.read_json(record_uri), "access")
        if access is None or not storage.exists(inside(access)):
            raise HTTPException(404, f"version {version} of {item_id!r} has no access copy")
        data = _picture(access, kind, THUMBNAIL_SIDE if size == "thumb" else None)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @app.post("/api/items/{item_id}/check", dependencies=[Depends(may_read)],
              summary="Check a colour map or target prompt against the item's caption (changes nothing)")
    def check(item_id: str, target: ColorRequest) -> dict:
        return check_target(latest_record(_item_id(item_id)), target.color_map, target.target_prompt)

    @app.post("/api/recolor", dependencies=[Depends(may_change)], status_code=202,
              summary="Recolour one or more items (starts the reprocess flow)")
    @app.post("/api/recolour", dependencies=[Depends(may_change)], status_code=202, include_in_schema=False)
    def recolor(body: RecolorRequest) -> dict:  # /api/recolour: the former spelling, kept for existing clients
        targets, problems = [], {}
        for target in body.targets:
            item_id = _item_id(target.item_id)
            checked = check_target(latest_record(item_id), target.color_map, target.target_prompt)
            if not checked["ok"]:
                problems[item_id] = checked["problem"]
            else:
                targets.append({"item_id": item_id, "color_map": checked.get("color_map"),
                                "target_prompt": checked.get("target_prompt")})
        if problems:
            raise HTTPException(400, {"problems": problems})
        return jobs.start(targets).to_dict()

    @app.get("/api/jobs/{job_id}", dependencies=[Depends(may_read)], summary="A recolour job's progress")
    def get_job(job_id: str) -> dict:
        job = jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} on this server")
        return job.to_dict()

    @app.post("/api/items/{item_id}/decisions", dependencies=[Depends(may_change)], status_code=201,
              summary="Approve or reject a version, with a note (appended; nothing is overwritten)")
    def decide(item_id: str, body: DecisionRequest) -> dict:
        entry = record_decision(output, _item_id(item_id), body.version, body.decision, body.decided_by, body.note)
        publish_review_run(output, [entry])
        table.refresh(wait=False)  # shown at once, stored in the background
        return entry

    # 4. Pages.
    @app.get("/api-docs", response_class=HTMLResponse, dependencies=[Depends(may_read)], include_in_schema=False)
    def api_page(request: Request) -> str:
        """The JSON API, listed from its OpenAPI document (offline; /docs is FastAPI's Swagger UI, from a CDN)."""
        routes = [{"method": method.upper(), "path": path, "summary": operation.get("summary", ""),
                   "parameters": [p["name"] for p in operation.get("parameters", [])],
                   "body": bool(operation.get("requestBody"))}
                  for path, methods in app.openapi()["paths"].items() for method, operation in methods.items()]
        limits = {"prompt_chars": MAX_PROMPT_CHARS, "prompt_words": MAX_PROMPT_WORDS,
                  "map_entries": MAX_COLOUR_MAP_ENTRIES}
        return render_page("api.html", package="review", title="DiffColor review: JSON API", routes=routes,
                           limits=limits, **page_context(request))

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in the browser's console

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request) -> Response:
        """The sign-in form. A token in the URL is refused, never used: URLs end up in logs and histories."""
        if "token" in request.query_params:
            return HTMLResponse(render_page("login.html", package="review", title="DiffColor review: sign in",
                                            problem="a token in a URL is not accepted (URLs are logged); "
                                                    "paste it into the form", **page_context(request)), 400)
        return HTMLResponse(render_page("login.html", package="review", title="DiffColor review: sign in",
                                        problem=None, **page_context(request)))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        same_origin(request)
        try:
            fields = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
        except ValueError:
            raise HTTPException(400, "the sign-in form has one field, token") from None
        token = (fields.get("token") or [""])[0].strip()
        if not token or not hmac.compare_digest(token.encode(), config.token.encode()):
            return HTMLResponse(render_page("login.html", package="review", title="DiffColor review: sign in",
                                            problem="wrong token", **page_context(request)), 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(may_read)], include_in_schema=False)
    def collection_page(request: Request, status: str | None = None, collection: str | None = None,
                        q: str | None = None, smoke: str | None = None, decision: str | None = None,
                        page: int = Query(1, ge=1), ranges: tuple = Depends(metric_ranges)) -> str:
        filters = filters_of(status, collection, q, smoke, decision, ranges)
        indexing_error = None
        try:
            listing = table.page(filters, (page - 1) * PAGE_SIZE, PAGE_SIZE, wait=INDEX_WAIT_SECONDS)
            (total, rows), building = listing, listing.building
        except StillIndexing as indexing:
            total, rows, building, indexing_error = None, [], True, indexing.error
        try:
            collections = table.collections(wait=0)
        except StillIndexing:  # not known before the collection is indexed: the one chosen, if any
            collections = [filters.collection] if filters.collection else []
        query = {key: value for key, value in request.query_params.items() if key != "page" and value}
        return render_page("collection.html", package="review", title="DiffColor review", rows=rows, total=total,
                           page=page, pages=max(1, -(-(total or 0) // PAGE_SIZE)), query=query, metrics=metrics(),
                           card_metrics=[declared for declared in declarations.metrics() if declared.summary],
                           collections=collections, smoke_any=any(row.get("smoke_run") for row in rows),
                           building=building, indexing_error=indexing_error, **page_context(request))

    @app.get("/items/{item_id}", response_class=HTMLResponse, dependencies=[Depends(may_read)],
             include_in_schema=False)
    def item_page(request: Request, item_id: str) -> str:
        item = item_data(_item_id(item_id))
        return render_page("item.html", package="review", title=f"Item {item['item_id']}", item=item,
                           smoke=any(version.get("smoke_run") for version in item["versions"]),
                           **page_context(request))

    return app
