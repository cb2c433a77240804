"""The provider service on Ray Serve: batched translation, aggregation rounds, PEFT export.

    gt-ray serve --checkpoint runs/world_lengths/translator --card runs/world_lengths/pair_card.json \\
        --tokens runs/world_lengths/tokens.json --state-dir runs/world_lengths/serve_state   # 127.0.0.1:8000
    serve run serve/config.yaml                                           # the same, from YAML

Two deployments, one role each:

- ``Translator`` loads the translator checkpoint once (its fingerprints checked against the
  pair card) and translates batches ``(B, L_tiny, d_tiny)``. The batch size and wait are
  its ``user_config``, applied in place by ``reconfigure``. It counts the batches it
  translates (``GET /v1/stats``).
- ``Aggregator`` is the FastAPI ingress: bearer-token auth, body-size limit, request
  validation, and the rounds of :mod:`gt_ray.rounds` on the state directory (one replica:
  the state directory is local to it). It loads the card's LLM lazily, to export adapters.
  ``/v1/translate`` requests are batched here, with ``@serve.batch`` set to the
  Translator's current settings (adopted from its answers), so one batch costs one
  Translator call: the per-request hop was most of a request's cost
  (``benchmarks/bench_serve.py``).

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``)::

    GET  /healthz                              liveness, no auth
    GET  /readyz                               the Translator answers, the state dir is writable
    POST /v1/rounds                            admin: open a round (CreateRoundRequest)
    GET  /v1/rounds/{round_id}                 status (admin: every org; an org: its receipt and counts)
    POST /v1/rounds/{round_id}/submissions     an org: submit its TinyLM vector (gt_ray.org.client API)
    POST /v1/rounds/{round_id}/close           admin: aggregate, translate, export the adapter
    GET  /v1/rounds/{round_id}/adapter         admin or a submitting org: the PEFT adapter zip
    POST /v1/translate                         any token: translate one vector, no round (JSON with
                                               base64, or the safetensors file as application/octet-stream)
    GET  /v1/stats                             admin: the Translator's batch sizes

Errors are ``{"detail": message}``: 401 bad/missing token, 403 wrong org or not admin,
404 unknown round, 409 conflict (slot taken, key reused, closed, quorum not met), 413 body
too large, 415 a translate body neither JSON nor octet-stream, 422 invalid request or
vector (also an all-zero one, or one whose norm is far outside the shadow corpus' range:
``gt_ray.wire.check_update_content``). A client mistake never gives a 500.

Tokens: the tokens file is ``{"admin": TOKEN, "orgs": {ORG_ID: TOKEN, ...}}``; tokens are
at least 16 printable characters, all different; only their sha256 is kept in memory and
they are compared with ``hmac.compare_digest``; they are never logged. The deployments get
file paths as arguments, never tokens (Serve shows arguments in its status).
"""

import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from gt_ray.models import LoadedModel, PairCard, load_card_side
from gt_ray.wire import HEADER_VALUE, check_id
from gt_ray.rounds import OrgNotExpectedError, RoundConflictError, RoundSpec, RoundState, RoundStore, UnknownRoundError
from gt_ray.wire import check_update_content, parse_update_bytes, update_to_bytes
from gt_ray.translator.checkpoint import load_norm_bound, load_translator
from serve.schemas import (AdapterInfo, BatchSettings, CreateRoundRequest, ErrorBody, Health, ProviderArgs,
                           Readiness, Receipt, RoundResult, RoundStatus, SubmissionRequest, TranslateRequest,
                           TranslateResponse, TranslatorStats)

logger = logging.getLogger(__name__)

APP_NAME = "gt-ray"
MIN_TOKEN_CHARS = 16
CLOSE_TIMEOUT_S = 600.0
"""Longest a round's translation may take inside ``close``."""
ERRORS = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 413, 422)}
OCTET_STREAM = "application/octet-stream"
TRANSLATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": TranslateRequest.model_json_schema()},
    OCTET_STREAM: {"schema": {"type": "string", "format": "binary",
                              "description": "the TinyLM update-vector safetensors file itself"}}}}}


# ----------------------------------------------------------------------------- auth


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: an organization, or the admin (``org_id=None``)."""

    org_id: str | None

    @property
    def is_admin(self) -> bool:
        return self.org_id is None


class TokenTable:
    """Bearer tokens -> callers. Keeps sha256 digests only; never logs a token."""

    def __init__(self, admin: str, orgs: dict[str, str]) -> None:
        self._entries = [(Caller(None), _digest(admin))] + [(Caller(o), _digest(t)) for o, t in sorted(orgs.items())]

    @classmethod
    def from_file(cls, path: str | Path) -> "TokenTable":
        """Read ``{"admin": TOKEN, "orgs": {ORG_ID: TOKEN}}``.

        Raises:
            ValueError: a missing or malformed file, a bad org id, a short, repeated or
                non-printable token (the message never contains a token).
        """
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"tokens file {path}: cannot read it as JSON ({type(e).__name__})") from None
        if not (isinstance(data, dict) and set(data) == {"admin", "orgs"} and isinstance(data["orgs"], dict)):
            raise ValueError(f'tokens file {path}: expected {{"admin": TOKEN, "orgs": {{ORG_ID: TOKEN}}}}')
        tokens = [("admin", data["admin"])] + [(f"org {o!r}", t) for o, t in data["orgs"].items()]
        for org in data["orgs"]:
            check_id("tokens file org id", org)
        for who, token in tokens:
            if not (isinstance(token, str) and HEADER_VALUE.fullmatch(token) and len(token) >= MIN_TOKEN_CHARS):
                raise ValueError(f"tokens file {path}: the token of {who} must be at least {MIN_TOKEN_CHARS} "
                                 "printable ASCII characters without whitespace")
        if len({t for _, t in tokens}) != len(tokens):
            raise ValueError(f"tokens file {path}: two callers share a token")
        return cls(data["admin"], data["orgs"])

    def identify(self, token: str) -> Caller | None:
        """The caller holding ``token``, or None. Compares with every entry, in constant time each."""
        given = _digest(token)
        found = None
        for caller, digest in self._entries:
            if hmac.compare_digest(given, digest):
                found = caller
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


# ----------------------------------------------------------------------------- body limit


class BodyLimitMiddleware:
    """ASGI middleware: 413 when Content-Length, or the bytes actually received, exceed the limit.

    The body is read here (at most ``max_bytes``) and replayed to the app, so an endpoint
    never sees a body over the limit, whether or not the client declared its length.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "Content-Length is not a number")
                return
            if int(declared) > self.max_bytes:
                await _send_error(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _send_error(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# ----------------------------------------------------------------------------- Translator


@serve.deployment(name="Translator")
class Translator:
    """Holds the translator checkpoint; translates TinyLM vectors into LLM vectors in batches.

    Args:
        checkpoint: translator checkpoint directory.
        card: pair card JSON path; the checkpoint's fingerprints and layouts must match it.
        max_ongoing_requests: this deployment's setting, which caps any batch size.
        threads: torch intra-op threads.
    """

    def __init__(self, checkpoint: str, card: str, max_ongoing_requests: int, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        pair = PairCard.load(card)
        self.model = load_translator(checkpoint, expected_fingerprints={"tiny": pair.tiny.layout_fingerprint,
                                                                         "llm": pair.llm.layout_fingerprint},
                                     tiny=lambda: load_card_side(pair, "tiny"))  # for input: behaviour
        cfg = self.model.config
        want = ((pair.tiny.n_layers, pair.tiny.d_layer), (pair.llm.n_layers, pair.llm.d_layer))
        if (tuple(self.model.input_shape), (cfg.L_llm, cfg.d_llm)) != want:
            raise ValueError(f"translator {checkpoint} maps {tuple(self.model.input_shape)} -> {(cfg.L_llm, cfg.d_llm)}, "
                             f"the card needs {want[0]} -> {want[1]}")
        self.max_ongoing_requests = max_ongoing_requests
        self.settings = BatchSettings()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.busy_s = 0.0  # seconds spent translating batches
        self.started_at = time.time()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``{"max_batch_size": B, "batch_wait_timeout_s": T}`` in place (``user_config``).

        The ingress forms the batches (one hop per batch, not per request) and adopts these
        settings from every answer of :meth:`translate_stack` and :meth:`stats`.

        Raises:
            ValueError: bad values, or a batch size above ``max_ongoing_requests``.
        """
        settings = BatchSettings.model_validate(user_config)
        if settings.max_batch_size > self.max_ongoing_requests:
            raise ValueError(f"max_batch_size {settings.max_batch_size} exceeds this deployment's "
                             f"max_ongoing_requests {self.max_ongoing_requests}: batches could never fill")
        self.settings = settings
        logger.info("batching: max_batch_size=%d batch_wait_timeout_s=%g", settings.max_batch_size,
                    settings.batch_wait_timeout_s)

    async def translate_stack(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """A batch ``(B, L_tiny, d_tiny)`` -> ``((B, L_llm, d_llm), batch settings)``.

        On the replica's user event loop, not in a thread: the forward pass is Python-heavy
        and a thread would only fight the loop for the GIL; calls arriving meanwhile wait.
        """
        self.batch_sizes[x.shape[0]] += 1
        t0 = time.perf_counter()
        y = self.model.translate(x)  # (B, L_llm, d_llm)
        self.busy_s += time.perf_counter() - t0
        return y, self.settings.model_dump()

    def stats(self) -> dict[str, Any]:
        """The batches translated since the replica started, and the current settings."""
        return {"batches": sum(self.batch_sizes.values()),
                "requests": sum(k * v for k, v in self.batch_sizes.items()),
                "max_batch_seen": max(self.batch_sizes, default=0),
                "histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())}, "busy_s": self.busy_s,
                **self.settings.model_dump(), "replica_started_at": self.started_at}


# ----------------------------------------------------------------------------- Aggregator


@contextlib.contextmanager
def http_errors(invalid_input: bool = True) -> Iterator[None]:
    """Map :mod:`gt_ray.rounds` errors to HTTP; ``ValueError`` is the client's (422) when ``invalid_input``."""
    try:
        yield
    except UnknownRoundError as e:
        raise HTTPException(404, str(e)) from None
    except OrgNotExpectedError as e:
        raise HTTPException(403, str(e)) from None
    except RoundConflictError as e:
        raise HTTPException(409, str(e)) from None
    except ValueError as e:
        if not invalid_input:
            raise
        raise HTTPException(422, " ".join(str(e).split())[:1000]) from None


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """A JSON body validated by ``model``; 422 with one line per error, as FastAPI's own bodies get."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        parts = [f"{'.'.join(['body', *map(str, err['loc'])])}: {err['msg']}" for err in e.errors()]
        raise HTTPException(422, "; ".join(parts)[:1000]) from None


def decode_vector(text: str) -> bytes:
    """Strict base64 -> bytes.

    Raises:
        HTTPException: 422 when it is not base64.
    """
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "vector_b64 is not valid base64") from None


@serve.deployment(name="Aggregator", num_replicas=1)
@serve.ingress()
class Aggregator:
    """The HTTP ingress: auth, validation, rounds on the state directory, adapter export.

    Args:
        translator: handle of the Translator deployment.
        args: :class:`serve.schemas.ProviderArgs` as a dict (paths only, no tokens).
    """

    def __init__(self, translator: DeploymentHandle, args: dict[str, Any]) -> None:
        self.args = ProviderArgs.model_validate(args)
        self.card = PairCard.load(self.args.card)
        self.tokens = TokenTable.from_file(self.args.tokens)
        bound = None if self.args.outlier_factor is None else load_norm_bound(
            self.args.checkpoint, self.args.outlier_factor, self.card.tiny.layout_fingerprint)
        self.store = RoundStore(self.args.state_dir, self.card, bound)
        self.translator = translator
        self.batch_settings = BatchSettings()
        self._adopt(self.args.batch_settings())  # the Translator's initial user_config; its answers update it
        self._llm: LoadedModel | None = None
        self._llm_lock = threading.Lock()  # export writes the LLM's LoRA weights: one at a time
        logger.info("provider ready: card %s, %d rounds in %s", self.card.card_id, len(self.store.round_ids()),
                    self.store.root)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # --- work behind the routes (blocking parts run in threads)

    async def create_round(self, body: CreateRoundRequest) -> tuple[RoundState, bool]:
        """Open a round (422 bad spec, 409 same id with another spec); ``(state, created)``."""
        fields = body.model_dump(exclude={"round_id"})
        with http_errors():
            spec = RoundSpec(**fields)
            return await asyncio.to_thread(self.store.create_round, spec, body.round_id)

    async def submit(self, caller: Caller, round_id: str, body: SubmissionRequest,
                     idempotency_key: str | None) -> Receipt:
        """Accept ``caller``'s vector into a round (403/404/409/422 as in the module docstring)."""
        if caller.is_admin:
            raise HTTPException(403, "submissions need the organization's token, not the admin's")
        if caller.org_id != body.org_id:
            raise HTTPException(403, f"the token does not belong to organization {body.org_id!r}")
        if idempotency_key is not None and not (HEADER_VALUE.fullmatch(idempotency_key) and len(idempotency_key) <= 255):
            raise HTTPException(422, "Idempotency-Key must be 1-255 printable ASCII characters without whitespace")
        blob = decode_vector(body.vector_b64)
        with http_errors():
            receipt = await asyncio.to_thread(self.store.submit, round_id, body.org_id, blob, body.n_examples,
                                              idempotency_key)
        return Receipt(**receipt.to_dict())

    def _adopt(self, settings: dict[str, Any]) -> None:
        """Batch with the Translator's current ``user_config`` (it changes in place)."""
        settings = BatchSettings.model_validate(settings)
        if settings != self.batch_settings:
            self.translate_batch.set_max_batch_size(settings.max_batch_size)
            self.translate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
            self.batch_settings = settings

    @serve.batch(max_batch_size=BatchSettings().max_batch_size,
                 batch_wait_timeout_s=BatchSettings().batch_wait_timeout_s)
    async def translate_batch(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One TinyLM vector ``(L_tiny, d_tiny)`` per call -> its LLM vector; one Translator call per batch."""
        y, settings = await self.translator.translate_stack.remote(torch.stack(xs))  # (B, L_llm, d_llm)
        self._adopt(settings)
        return list(y)

    async def translate(self, blob: bytes) -> tuple[bytes, torch.Tensor, str]:
        """Validate one TinyLM vector file, translate it in a batch; ``(LLM file bytes, vector, source sha256)``."""
        with http_errors():
            x, _ = parse_update_bytes(blob, self.card.tiny.layout_fingerprint,
                                      (self.card.tiny.n_layers, self.card.tiny.d_layer))
            check_update_content(x, self.store.norm_bound)
        y = await self.translate_batch(x)  # (L_llm, d_llm), batched with other requests
        source = hashlib.sha256(blob).hexdigest()
        out = update_to_bytes(y, self.card.llm.layout_fingerprint,
                              {"model_side": "llm", "card_id": self.card.card_id, "source_sha256": source})
        return out, y, source

    def _translate_blocking(self, x: torch.Tensor) -> torch.Tensor:
        # Runs in a worker thread (store.close is blocking), never on the event loop.
        return self.translator.translate_stack.remote(x).result(timeout_s=CLOSE_TIMEOUT_S)[0]

    def _close_and_export(self, round_id: str) -> RoundState:
        self.store.close(round_id, self._translate_blocking)
        with self._llm_lock:
            if self._llm is None:
                self._llm = load_card_side(self.card, "llm")  # checks weights, layout and init against the card
            return self.store.export_adapter(round_id, self._llm)

    async def close(self, round_id: str) -> RoundState:
        """Close (aggregate, translate) and export a round; both steps are idempotent."""
        with http_errors(invalid_input=False):
            check_id_http(round_id)
            return await asyncio.to_thread(self._close_and_export, round_id)

    async def get(self, round_id: str) -> RoundState:
        """A round's state (404 unknown, 422 impossible id)."""
        with http_errors():
            return await asyncio.to_thread(self.store.get, round_id)

    async def get_for(self, round_id: str, caller: Caller) -> RoundState:
        """A round's state for ``caller``: 403 for an organization the round does not list."""
        state = await self.get(round_id)
        expected = state.spec.expected_orgs
        if not caller.is_admin and expected is not None and caller.org_id not in expected:
            raise HTTPException(403, f"organization {caller.org_id!r} is not expected in round {round_id!r}")
        return state

    def status(self, state: RoundState, caller: Caller) -> RoundStatus:
        """A round's status as ``caller`` may see it."""
        result = None
        if state.result is not None:
            r = state.result
            result = RoundResult(closed_at=r["closed_at"], n_submissions=r["n_submissions"],
                                 update_sha256=r["update_sha256"], update_norm=r["update_norm"], dp=r["dp"],
                                 adapter=None if r["adapter"] is None else AdapterInfo(**{
                                     k: r["adapter"][k] for k in ("kind", "r", "lora_alpha", "sha256")}))
        mine = caller.org_id in state.submissions
        spec = state.spec.to_dict()
        if not caller.is_admin:
            del spec["expected_orgs"]  # participants do not learn each other
        expected = state.spec.expected_orgs
        return RoundStatus(
            round_id=state.round_id, status=state.status, created_at=state.created_at, spec=spec,
            n_expected=None if expected is None else len(expected),
            n_submissions=len(state.submissions), min_submissions=state.spec.min_submissions,
            ready_to_close=state.ready_to_close, orgs=sorted(state.submissions) if caller.is_admin else None,
            your_receipt=Receipt(**state.receipt(caller.org_id, duplicate=False).to_dict()) if mine else None,
            result=result)

    async def adapter(self, round_id: str, caller: Caller) -> Path:
        """The adapter zip of a closed round, for the admin or an organization that submitted to it."""
        state = await self.get(round_id)
        if not caller.is_admin and caller.org_id not in state.submissions:
            raise HTTPException(403, f"only the admin and the organizations of round {round_id!r} get its adapter")
        with http_errors():
            return self.store.adapter_zip(round_id)

    async def stats(self) -> dict[str, Any]:
        """The Translator replica's batch statistics (and its settings, adopted here)."""
        stats = await self.translator.stats.remote()
        self._adopt({k: stats[k] for k in BatchSettings.model_fields})
        return stats

    async def readiness(self) -> dict[str, str]:
        """``{check: "ok" | reason}``: the Translator answers within 5 s, the state dir is writable."""
        checks = {}
        try:
            await asyncio.wait_for(self.stats(), timeout=5.0)
            checks["translator"] = "ok"
        except Exception as e:  # any failure means not ready; the reason is reported, not raised
            checks["translator"] = f"unavailable ({type(e).__name__})"
        checks["state_dir"] = "ok" if os.access(self.store.root, os.W_OK) else "not writable"
        return checks


def check_id_http(round_id: str) -> None:
    """422 for a round id that cannot exist (checked before it becomes a path)."""
    try:
        check_id("round_id", round_id)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None


def build_api(service: Aggregator) -> FastAPI:
    """The FastAPI app of the Aggregator: routes, auth dependencies, error handlers."""
    api = FastAPI(title="gt-ray provider", version="1",
                  description="Translate TinyLM LoRA updates into LLM updates; aggregation rounds; PEFT export.")
    api.add_middleware(BodyLimitMiddleware, max_bytes=service.args.max_body_bytes)
    bearer = HTTPBearer(auto_error=False)

    # async: FastAPI runs a sync dependency in a worker thread, a hop per request
    async def caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        who = None if credentials is None else service.tokens.identify(credentials.credentials)
        if who is None:
            detail = "missing bearer token" if credentials is None else "invalid bearer token"
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
        return who

    async def admin(who: Caller = Depends(caller)) -> Caller:
        if not who.is_admin:
            raise HTTPException(403, "this needs the admin token")
        return who

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable line, e.g. "body.n_examples: Input should be greater than or equal to 1".
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)[:1000] or "invalid request"}, status_code=422)

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @api.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz() -> JSONResponse:
        checks = await service.readiness()
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(jsonable_encoder(Readiness(status="ready" if ok else "not ready", checks=checks)),
                            status_code=200 if ok else 503)

    @api.post("/v1/rounds", response_model=RoundStatus, status_code=201, responses=ERRORS)
    async def create_round(body: CreateRoundRequest, response: Response, who: Caller = Depends(admin)) -> RoundStatus:
        state, created = await service.create_round(body)
        response.status_code = 201 if created else 200
        return service.status(state, who)

    @api.get("/v1/rounds/{round_id}", response_model=RoundStatus, responses=ERRORS)
    async def get_round(round_id: str, who: Caller = Depends(caller)) -> RoundStatus:
        return service.status(await service.get_for(round_id, who), who)

    @api.post("/v1/rounds/{round_id}/submissions", response_model=Receipt, status_code=201, responses=ERRORS)
    async def submit(round_id: str, body: SubmissionRequest, response: Response, who: Caller = Depends(caller),
                     idempotency_key: str | None = Header(None)) -> Receipt:
        receipt = await service.submit(who, round_id, body, idempotency_key)
        response.status_code = 200 if receipt.duplicate else 201
        return receipt

    @api.post("/v1/rounds/{round_id}/close", response_model=RoundStatus, responses=ERRORS)
    async def close(round_id: str, who: Caller = Depends(admin)) -> RoundStatus:
        return service.status(await service.close(round_id), who)

    @api.get("/v1/rounds/{round_id}/adapter", response_class=FileResponse, responses=ERRORS)
    async def adapter(round_id: str, who: Caller = Depends(caller)) -> FileResponse:
        path = await service.adapter(round_id, who)
        return FileResponse(path, media_type="application/zip", filename=f"{round_id}-adapter.zip")

    @api.post("/v1/translate", response_model=TranslateResponse, openapi_extra=TRANSLATE_BODY,
              responses={**ERRORS, 200: {"content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}},
                                         "description": "JSON in, JSON out; a safetensors body in, the LLM "
                                                        "safetensors file out (sha256s in the X-Sha256 and "
                                                        "X-Source-Sha256 headers)"}, 415: {"model": ErrorBody}})
    async def translate(request: Request, who: Caller = Depends(caller)) -> Response:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind not in ("application/json", OCTET_STREAM):
            raise HTTPException(415, f"send application/json or {OCTET_STREAM} (the safetensors file), not {kind!r}")
        raw = await request.body()
        blob = raw if kind == OCTET_STREAM else decode_vector(parse_body(TranslateRequest, raw).vector_b64)
        out, y, source = await service.translate(blob)
        sha = hashlib.sha256(out).hexdigest()
        if kind == OCTET_STREAM:
            return Response(out, media_type=OCTET_STREAM, headers={"X-Sha256": sha, "X-Source-Sha256": source})
        body = TranslateResponse(vector_b64=base64.b64encode(out).decode("ascii"), shape=list(y.shape), sha256=sha,
                                 fingerprint=service.card.llm.layout_fingerprint, source_sha256=source)
        return Response(body.model_dump_json(), media_type="application/json")

    @api.get("/v1/stats", response_model=TranslatorStats, responses=ERRORS)
    async def stats(who: Caller = Depends(admin)) -> TranslatorStats:
        return TranslatorStats(**await service.stats())

    return api


# ----------------------------------------------------------------------------- the application


def build_app(args: ProviderArgs | dict[str, Any]) -> serve.Application:
    """The provider application: ``Aggregator(Translator)``, for ``serve.run`` or ``serve run``.

    Args:
        args: :class:`ProviderArgs`, or the dict ``serve run serve/config.yaml`` passes.

    Returns:
        The bound application.

    Raises:
        pydantic.ValidationError: bad arguments (missing files, batch size above
            ``max_ongoing_requests``).
    """
    args = args if isinstance(args, ProviderArgs) else ProviderArgs.model_validate(args)
    translator = Translator.options(
        max_ongoing_requests=args.max_ongoing_requests, user_config=args.batch_settings(),
        ray_actor_options={"num_cpus": args.translator_num_cpus},
    ).bind(args.checkpoint, args.card, args.max_ongoing_requests, args.translator_threads)
    return Aggregator.options(
        max_ongoing_requests=args.max_ongoing_requests, ray_actor_options={"num_cpus": args.ingress_num_cpus},
    ).bind(translator, args.model_dump())
