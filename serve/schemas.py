"""Typed arguments and HTTP schemas of the provider service (pydantic; no Ray import).

``ProviderArgs`` is what ``serve run serve/config.yaml`` passes to ``serve.app:build_app``
and what ``gt-ray serve`` builds from its flags. The request/response models are the
service's OpenAPI schema (``GET /openapi.json``); the submission schema is the one
``gt_ray.org.client.submit_vector`` sends.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gt_ray import storage
from gt_ray.aggregate import AGGREGATION_RULES
from gt_ray.wire import ID_PATTERN
from gt_ray.rounds import DEFAULT_MODE, ROUND_MODES, ROUND_STATUSES
from gt_ray.wire import DEFAULT_OUTLIER_FACTOR
from gt_ray.translator.checkpoint import CONFIG_FILENAME

ID_REGEX = f"^{ID_PATTERN.pattern}$"
MAX_N_EXAMPLES = 10**12


class ProviderArgs(BaseModel):
    """Arguments of the provider application (``serve.app:build_app``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    checkpoint: str
    """Translator checkpoint directory (``save_translator``), with the card's fingerprints."""
    card: str
    """Pair card JSON; vectors and the checkpoint are checked against it."""
    tokens: str
    """Tokens file: JSON ``{"admin": TOKEN, "orgs": {ORG_ID: TOKEN, ...}}`` (keep it 0600)."""
    state_dir: str
    """Where rounds, accepted vectors and results persist (created if missing)."""
    max_batch_size: int = Field(8, ge=1)
    """Initial ``@serve.batch`` size of the Translator (``user_config``, changeable in place)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """Initial wait for a batch to fill (``user_config``, changeable in place)."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Per replica, both deployments; the Translator's caps its batch size, so it must be
    at least every ``max_batch_size`` you will configure."""
    outlier_factor: float | None = Field(DEFAULT_OUTLIER_FACTOR, ge=1)
    """Refuse a submitted vector whose L2 norm is more than this many times outside the
    shadow corpus' range (``input_norms.json`` beside the checkpoint; without that file the
    bound is off, which the service logs); ``None`` turns the bound off. Rounds with a
    robust rule may accept outliers."""
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 beyond), checked on Content-Length and on the bytes."""
    host: str = "127.0.0.1"
    """HTTP host for ``gt-ray serve`` (``serve run`` takes ``http_options`` from the YAML)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port for ``gt-ray serve`` (``serve run`` takes ``http_options`` from the YAML)."""
    translator_num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved by the Translator replica."""
    translator_threads: int = Field(1, ge=1)
    """torch intra-op threads of the Translator replica (Ray sets 1 by default)."""
    ingress_num_cpus: float = Field(0.5, ge=0)
    """CPUs reserved by the Aggregator (ingress) replica; it also exports adapters."""

    @field_validator("checkpoint", "card", "tokens", "state_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # Replicas do not share the caller's working directory; a URI (checkpoint, card) stays as is.
        return storage.absolute(value)

    @model_validator(mode="after")
    def _check(self) -> "ProviderArgs":
        for name in ("tokens", "state_dir"):
            if storage.is_uri(getattr(self, name)):
                raise ValueError(f"{name} must be a local path (the tokens are a secret file; the round state "
                                 f"uses file locks), got {getattr(self, name)}")
        if not storage.is_file(storage.join(self.checkpoint, CONFIG_FILENAME)):
            raise ValueError(f"checkpoint {self.checkpoint} holds no {CONFIG_FILENAME}: not a translator checkpoint")
        for name in ("card", "tokens"):
            if not storage.is_file(getattr(self, name)):
                raise ValueError(f"{name} file not found: {getattr(self, name)}")
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(f"max_batch_size {self.max_batch_size} exceeds max_ongoing_requests "
                             f"{self.max_ongoing_requests}: batches could never fill")
        return self

    def batch_settings(self) -> dict[str, Any]:
        """The Translator's initial ``user_config``."""
        return BatchSettings(max_batch_size=self.max_batch_size,
                             batch_wait_timeout_s=self.batch_wait_timeout_s).model_dump()


class BatchSettings(BaseModel):
    """The Translator's ``user_config``: applied in place by ``reconfigure``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_batch_size: int = Field(8, ge=1)
    """Most vectors translated in one forward pass."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long the first request of a batch waits for more."""


# ----------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class CreateRoundRequest(_Request):
    """``POST /v1/rounds`` (admin): open a round; the same id and spec again is a no-op."""

    round_id: str | None = Field(None, pattern=ID_REGEX)
    """The id (default: a random ``r-...``)."""
    rule: Literal[AGGREGATION_RULES] = "mean"
    """Aggregation rule; ``weighted_mean`` weighs by ``n_examples``."""
    mode: Literal[ROUND_MODES] = DEFAULT_MODE
    """Aggregate the TinyLM vectors then translate once (default), or translate each then aggregate."""
    weight_space: bool = False
    """Export the exact mean of the LoRA products as one stacked rank ``n r`` adapter."""
    clip_norm: float | None = Field(None, gt=0)
    """Clip every vector to this L2 norm before aggregating."""
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    """Fraction dropped at each end by ``trimmed_mean``."""
    expected_orgs: list[str] | None = None
    """The organizations allowed to submit (default: any with a token)."""
    quorum: int | None = Field(None, ge=1)
    """Submissions needed to close (default: all expected, or 1)."""
    dp_epsilon: float | None = Field(None, gt=0)
    """Central Gaussian noise on the clipped mean: epsilon (unit: one organization)."""
    dp_delta: float | None = Field(None, gt=0, lt=1)
    """Central Gaussian noise: delta."""
    accept_outliers: bool = False
    """Take vectors outside the service's norm bound; only with rule ``median`` or ``trimmed_mean``."""


class SubmissionRequest(_Request):
    """``POST /v1/rounds/{round_id}/submissions``: what ``gt_ray.org.client.submit_vector`` sends."""

    org_id: str = Field(pattern=ID_REGEX)
    """The submitting organization; must be the token's."""
    n_examples: int = Field(ge=1, le=MAX_N_EXAMPLES)
    """Its example count (the weight of ``weighted_mean``)."""
    vector_b64: str = Field(min_length=1)
    """Base64 of the update-vector safetensors file (never pickle)."""


class TranslateRequest(_Request):
    """``POST /v1/translate``: translate one TinyLM vector, outside any round."""

    vector_b64: str = Field(min_length=1)
    """Base64 of a TinyLM update-vector safetensors file."""


# ----------------------------------------------------------------------------- responses


class Receipt(BaseModel):
    """The submission receipt (201 new, 200 when ``duplicate``)."""

    receipt_id: str
    round_id: str
    org_id: str
    sha256: str
    """Hex sha256 of the decoded vector file bytes."""
    received_at: str
    duplicate: bool
    """True when the first receipt is returned again (nothing new stored)."""


class TranslateResponse(BaseModel):
    """A translated vector: an LLM update-vector safetensors file, base64."""

    vector_b64: str
    fingerprint: str
    """The card's LLM layout fingerprint."""
    shape: list[int]
    sha256: str
    """Hex sha256 of the returned file bytes."""
    source_sha256: str
    """Hex sha256 of the TinyLM file that was translated."""


class AdapterInfo(BaseModel):
    """The exported PEFT adapter of a closed round."""

    kind: Literal["update", "stacked"]
    """``update``: init + round update at the card's rank; ``stacked``: rank ``n r`` weight-space mean."""
    r: int
    lora_alpha: float
    sha256: str
    """Hex sha256 of the zip served by ``GET .../adapter``."""


class RoundResult(BaseModel):
    """What closing computed."""

    closed_at: str
    n_submissions: int
    update_sha256: str | None
    update_norm: float | None
    dp: dict[str, Any] | None
    """Central noise: epsilon, delta, sigma, clip_norm, unit, neighbouring."""
    adapter: AdapterInfo | None


class RoundStatus(BaseModel):
    """``GET /v1/rounds/{round_id}``: the admin sees every organization; an organization sees
    its own receipt and counts, never who else takes part."""

    round_id: str
    status: Literal[ROUND_STATUSES]
    created_at: str
    spec: dict[str, Any]
    """The round's spec; an organization gets it without ``expected_orgs``."""
    n_expected: int | None
    """How many organizations the round expects (``None``: any with a token)."""
    n_submissions: int
    min_submissions: int
    ready_to_close: bool
    orgs: list[str] | None = None
    """Organizations that submitted (admin only)."""
    your_receipt: Receipt | None = None
    """The caller's receipt, for an organization that submitted."""
    result: RoundResult | None = None


class TranslatorStats(BaseModel):
    """``GET /v1/stats`` (admin): the batches the Translator replica formed."""

    batches: int
    requests: int
    max_batch_seen: int
    histogram: dict[str, int]
    """``{batch size: number of batches}``."""
    busy_s: float
    """Seconds spent translating batches (the model's share of the time)."""
    max_batch_size: int
    batch_wait_timeout_s: float
    replica_started_at: float


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    detail: str
