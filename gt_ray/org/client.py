"""An organization's upload: its update vector file to the provider's service, with
retries and one idempotency key, and the check of the service's receipt.

HTTP API (the provider service implements it)
----------------------------------------------
``POST {endpoint}/v1/rounds/{round_id}/submissions`` with headers
``Authorization: Bearer TOKEN``, ``Idempotency-Key: K``, ``Content-Type: application/json``
and the JSON body (never pickled)::

    {"org_id": str, "n_examples": int, "vector_b64": base64 of the safetensors file's bytes}

- ``200``/``201``: the receipt, JSON
  ``{"receipt_id": str, "round_id": str, "org_id": str, "sha256": str, "received_at": str,
  "duplicate": bool}``; ``sha256`` is the hex sha256 of the decoded vector file bytes and
  ``duplicate`` is true when the key was seen before (the first receipt is returned again;
  no second submission is created). The client checks ``sha256``, ``org_id`` and ``round_id``.
- ``4xx``: JSON ``{"detail": message}`` (``401`` bad token, ``404`` unknown round, ``409``
  the key or the organization's slot in the round is taken by a different vector, ``413``
  too large, ``422`` invalid vector). Not retried.
- ``502``/``503``/``504`` and connection errors: retried with exponential backoff (at most
  ``max_attempts`` tries, a ``Retry-After`` header is honoured up to the backoff cap),
  always with the same ``Idempotency-Key``.

The default idempotency key is ``sha256("gt-ray-submission-v1", org_id, round_id, file
bytes)`` (length-prefixed parts), so running the same command twice never creates a
second submission.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from gt_ray.storage import sha256_bytes
from gt_ray.wire import HEADER_VALUE, check_id, load_update

logger = logging.getLogger(__name__)

RETRY_STATUSES = (502, 503, 504)
RECEIPT_KEYS = ("receipt_id", "round_id", "org_id", "sha256", "received_at", "duplicate")
SUBMISSIONS_PATH = "/v1/rounds/{round_id}/submissions"
IDEMPOTENCY_DOMAIN = b"gt-ray-submission-v1"


class SubmissionError(Exception):
    """The provider refused a submission, or it could not be delivered.

    Attributes:
        status: the HTTP status of the last answer (``None`` if there was none).
        detail: the server's ``detail`` message, or the last connection error.
        attempts: how many requests were made.
    """

    def __init__(self, message: str, status: int | None = None, detail: str = "", attempts: int = 0):
        super().__init__(message)
        self.status, self.detail, self.attempts = status, detail, attempts


def default_idempotency_key(org_id: str, round_id: str, vector_bytes: bytes) -> str:
    """The default idempotency key: sha256 over (domain, org_id, round_id, file bytes),
    each part prefixed with its length (8 bytes, big-endian)."""
    parts = (IDEMPOTENCY_DOMAIN, org_id.encode(), round_id.encode(), vector_bytes)
    return sha256_bytes(b"".join(len(part).to_bytes(8, "big") + part for part in parts))


def submit_vector(endpoint: str, token: str, round_id: str, org_id: str, vector: str | Path, *,
                  idempotency_key: str | None = None, max_attempts: int = 5, backoff_s: float = 0.5,
                  max_backoff_s: float = 8.0, timeout_s: float = 30.0,
                  session: requests.Session | None = None) -> dict[str, Any]:
    """Send an update vector file to the provider (see the module docstring for the API).

    The file is validated locally first and never sent if invalid. Connection errors and
    502/503/504 answers are retried with exponential backoff and jitter, every attempt
    with the same ``Idempotency-Key``; other answers are not retried.

    Args:
        endpoint: the provider's base URL (``http://`` or ``https://``).
        token: the bearer token (never logged).
        round_id, org_id: the round and this organization.
        vector: the update vector file written by :func:`gt_ray.org.finetune.finetune_org`.
        idempotency_key: the key (default: :func:`default_idempotency_key` of the file).
        max_attempts: requests at most, ``>= 1``.
        backoff_s: delay after the first failure; doubles after each, capped at ``max_backoff_s``.
        timeout_s: per-request read timeout.
        session: a ``requests.Session`` to use (default: a new one).

    Returns:
        The receipt dict (``receipt_id``, ``round_id``, ``org_id``, ``sha256``,
        ``received_at``, ``duplicate``).

    Raises:
        ValueError: an invalid vector file, bad ids, token, key or endpoint; or metadata that
            names another organization or round.
        SubmissionError: the server refused (4xx, 500), the receipt does not match what
            was sent, or all attempts failed.
    """
    check_id("org_id", org_id)
    check_id("round_id", round_id)
    if not HEADER_VALUE.fullmatch(token or ""):
        raise ValueError("the token must be non-empty printable ASCII without whitespace")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must start with http:// or https://, got {endpoint!r}")
    path = Path(vector)
    _, meta = load_update(path)  # refuses a missing, foreign or non-finite vector file
    n_examples = meta.get("n_examples")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"{path}: metadata has no valid n_examples ({n_examples!r}); "
                         "write the vector with `gt-ray org finetune`")
    for key, expected in (("org_id", org_id), ("round_id", round_id)):
        if meta.get(key) is not None and meta[key] != expected:
            raise ValueError(f"{path} was made for {key}={meta[key]!r}, not {expected!r}")
    blob = path.read_bytes()
    sha = sha256_bytes(blob)
    key = idempotency_key or default_idempotency_key(org_id, round_id, blob)
    if not HEADER_VALUE.fullmatch(key) or len(key) > 255:
        raise ValueError("the idempotency key must be 1-255 printable ASCII characters without whitespace")
    if endpoint.startswith("http://") and not re.match(r"http://(127\.0\.0\.1|localhost|\[::1\])[:/]?", endpoint):
        logger.warning("sending the token over plain http to %s: use https outside a test setup", endpoint)

    url = endpoint.rstrip("/") + SUBMISSIONS_PATH.format(round_id=quote(round_id, safe=""))
    body = json.dumps({"org_id": org_id, "n_examples": n_examples,
                       "vector_b64": base64.b64encode(blob).decode("ascii")}).encode()
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key,
               "Content-Type": "application/json", "Accept": "application/json"}
    jitter = random.Random(secrets.randbits(64))
    own_session = session is None
    session = session or requests.Session()
    last = ""
    try:
        for attempt in range(1, max_attempts + 1):
            retry_after = None
            try:
                resp = session.post(url, data=body, headers=headers, timeout=(min(10.0, timeout_s), timeout_s),
                                    allow_redirects=False)
            except requests.exceptions.SSLError as e:
                raise SubmissionError(f"TLS error talking to {endpoint}: {e}", detail=str(e), attempts=attempt) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code in (200, 201):
                    return _check_receipt(resp, sha, org_id, round_id, attempt)
                detail = _detail(resp)
                if resp.status_code not in RETRY_STATUSES:
                    raise SubmissionError(f"the provider refused the submission: HTTP {resp.status_code}: {detail}",
                                          status=resp.status_code, detail=detail, attempts=attempt)
                last = f"HTTP {resp.status_code}: {detail}"
                retry_after = _retry_after(resp)
            if attempt == max_attempts:
                break
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1)) * jitter.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, min(retry_after, max_backoff_s))
            logger.warning("submission attempt %d/%d failed (%s); retrying in %.2f s with the same idempotency key",
                           attempt, max_attempts, last, delay)
            time.sleep(delay)
    finally:
        if own_session:
            session.close()
    raise SubmissionError(f"could not submit after {max_attempts} attempts (last: {last}); re-running the same "
                          "command is safe: it sends the same idempotency key", detail=last, attempts=max_attempts)


def _detail(resp: requests.Response) -> str:
    try:
        detail = resp.json().get("detail", resp.text)
    except (ValueError, AttributeError):
        detail = resp.text
    detail = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)
    detail = " ".join(detail.split())
    return detail[:500] or resp.reason or "no detail"


def _retry_after(resp: requests.Response) -> float | None:
    try:
        value = float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _check_receipt(resp: requests.Response, sha: str, org_id: str, round_id: str, attempt: int) -> dict[str, Any]:
    try:
        receipt = resp.json()
    except ValueError:
        receipt = None
    if not isinstance(receipt, dict):
        raise SubmissionError(f"HTTP {resp.status_code} without a JSON receipt", status=resp.status_code,
                              attempts=attempt)
    missing = [k for k in RECEIPT_KEYS if k not in receipt]
    if missing:
        raise SubmissionError(f"the receipt lacks {missing}", status=resp.status_code, attempts=attempt)
    if receipt["sha256"] != sha or receipt["org_id"] != org_id or str(receipt["round_id"]) != round_id:
        raise SubmissionError(
            f"the receipt does not match what was sent (sha256 {str(receipt['sha256'])[:12]}... vs {sha[:12]}..., "
            f"org {receipt['org_id']!r}, round {receipt['round_id']!r})", status=resp.status_code, attempts=attempt)
    logger.info("submitted on attempt %d: receipt %s%s", attempt, receipt["receipt_id"],
                " (the provider already had it)" if receipt["duplicate"] else "")
    return receipt
