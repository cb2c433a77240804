"""Task data: the built-in generated task world, real data from local files, batching.

The generated world (after ``shared/TINY_WORLD.md``): string and arithmetic tasks, each
with a parameter ``k`` in 0..9 (the default world uses :data:`BASE_TASKS`; the per-character
map tasks ``shift``, ``mirror``, ``affine`` and ``spell`` take inputs of 3 or 8 characters).
Pretraining prompts show ``k`` (``C3:abcde=``); fine-tuning prompts hide it (``C?:abcde=``). A dataset (a shadow subset or an
organization's private data) has one secret ``k`` and a Dirichlet mixture over tasks, so
a LoRA update has to learn the secret, and the translator has to carry it over.

Inputs are split into disjoint pools by a stable hash of (task, input): ``public`` for the
provider (pretraining and shadow corpus), ``private_train`` and ``private_test`` for the
organizations. A pool never yields an input of another pool, at any sample size.

Real data (``tasks.data_files``): question/answer rows from local JSONL or Parquet files,
one file per split. A dataset is a seeded draw of rows from its split's pool
(:func:`data_pool`); a question found in the files of two splits is kept only in the split
its stable hash names (:func:`input_split`), so pools stay disjoint, and one file named
for several splits is divided by that hash. Prompts may go through the tokenizer's chat
template (``Example.chat_template``, applied by :func:`encode_examples`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from gt_ray.config import TaskConfig

logger = logging.getLogger(__name__)

LETTERS = "abcdefghijklmnop"
DIGITS = "0123456789"
N_PARAMS = 10
"""The task parameter k takes values 0..N_PARAMS-1."""

SPLITS: dict[str, tuple[float, float]] = {
    "public": (0.0, 0.6),
    "private_train": (0.6, 0.85),
    "private_test": (0.85, 1.0),
}
"""Split name -> range of the stable input hash in [0, 1). Disjoint by construction."""
PUBLIC_SPLITS = ("public",)
PRIVATE_SPLITS = ("private_train", "private_test")

PAD = "<pad>"
EOS = ";"
WORLD_VERSION = 2
"""Bump when generated data changes, so cached pretrained models are rebuilt.
2: ``add`` takes 3-digit inputs (900 of them; 2-digit ones left only 59 public inputs)."""
MIN_WEIGHT = 0.1
"""A task with at least this mixture weight is part of a dataset's combination."""
DATA_TASK = "data"
"""The task name of datasets drawn from ``tasks.data_files`` (their mixture is ``{DATA_TASK: 1}``)."""
CHAT_TEMPLATE_MODES = ("auto", "on", "off")
"""``Example.chat_template``: use the tokenizer's chat template if it has one, always
(an error without one), or never."""
ANSWER_MODES = ("full", "final")
"""``tasks.answer``: train on the whole answer text, or on the final answer after ``####``."""


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair. ``answer`` is the training target and what exact match checks.

    With ``chat_template`` ``auto`` or ``on``, :func:`encode_examples` puts ``prompt`` into
    the tokenizer's chat template as the user's turn (the answer is the assistant's, its
    leading whitespace dropped); ``off`` (generated tasks) tokenizes the prompt as is.
    """

    prompt: str
    answer: str
    task: str
    chat_template: str = "off"


@dataclass(frozen=True)
class Task:
    """A generated task: a marker character, an input sampler and a solver.

    ``lengths`` is the (shortest, longest) input the sampler draws, so a model's
    pretraining can leave out long inputs (``PretrainConfig.max_input_length``).
    """

    name: str
    marker: str
    make_input: Callable[[random.Random], str]
    solve: Callable[[str, int], str]
    lengths: tuple[int, int]


def _letters(n: int) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choice(LETTERS) for _ in range(n))


SPAN_LENGTHS = (3, 8)
"""Input lengths of the per-character map tasks, each drawn with probability 1/2: a short
and a long input (a model that saw one length in pretraining has one offset between input
and answer to learn)."""
_SPAN_RANGE = (min(SPAN_LENGTHS), max(SPAN_LENGTHS))


def _span(alphabet: str) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choice(alphabet) for _ in range(rng.choice(SPAN_LENGTHS)))


def _char_map(source: str, f: Callable[[int, int], int], target: str = LETTERS) -> Callable[[str, int], str]:
    """A solver that maps each character (at index i of ``source``) to ``target[f(i, k) mod len(target)]``.
    On the 16 letters every f below gives k = 0..9 ten different maps on every input (a
    10-letter alphabet, where most shifts wrap around, was not learnt in 600 pretraining steps)."""
    return lambda s, k: "".join(target[f(source.index(c), k) % len(target)] for c in s)


def _caesar(s: str, k: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + k) % len(LETTERS)] for c in s)


def _rotate(s: str, k: int) -> str:
    k %= len(s)
    return s[k:] + s[:k]


def _delete(s: str, k: int) -> str:
    k %= len(s)
    return s[:k] + s[k + 1 :]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("caesar", "C", _letters(5), _caesar, (5, 5)),
        Task("rotate", "R", _letters(7), _rotate, (7, 7)),
        Task("index", "I", _letters(10), lambda s, k: s[k], (10, 10)),
        Task("add", "A", lambda rng: str(rng.randrange(100, 1000)), lambda s, k: str(int(s) + k), (3, 3)),
        Task("delete", "D", _letters(7), _delete, (7, 7)),
        # Per-character maps on inputs of 3 or 8 characters: every k is its own map on every
        # input, and how well a model executes depends on the input lengths it has seen
        # (configs/world/lengths.yaml pretrains the TinyLM on short inputs only).
        Task("shift", "S", _span(LETTERS), _char_map(LETTERS, lambda i, k: i + k), _SPAN_RANGE),
        Task("mirror", "M", _span(LETTERS), _char_map(LETTERS, lambda i, k: 15 - i + k), _SPAN_RANGE),
        Task("affine", "F", _span(LETTERS), _char_map(LETTERS, lambda i, k: 3 * i + k), _SPAN_RANGE),
        Task("spell", "N", _span(DIGITS), _char_map(DIGITS, lambda i, k: i + k), _SPAN_RANGE),
    ]
}
BASE_TASKS = ("caesar", "rotate", "index", "add", "delete")
"""The first world's tasks: :data:`VOCAB` holds their markers (later tasks' markers are
appended by :func:`vocab` only for worlds that use them, so the first world's tokenizer
and cached models stay as they were)."""

CANONICAL_PROBE_INPUTS = 200
"""Inputs per task on which :func:`canonical_secret` compares two secrets' answers."""


@lru_cache(maxsize=None)
def _secret_classes(task: str) -> tuple[int, ...]:
    """For each k in ``range(N_PARAMS)``, the smallest k' whose answers equal k's on
    :data:`CANONICAL_PROBE_INPUTS` fixed inputs of ``task`` (derived from behaviour, never
    from the task's name)."""
    t = TASKS[task]
    rng = random.Random(f"canonical|{task}")
    inputs = [t.make_input(rng) for _ in range(CANONICAL_PROBE_INPUTS)]
    answers = [tuple(t.solve(x, k) for x in inputs) for k in range(N_PARAMS)]
    return tuple(answers.index(a) for a in answers)


def canonical_secret(task: str, k: int) -> int:
    """The smallest secret that behaves like ``k`` on ``task`` (``k`` itself for tasks
    outside the generated world or secrets outside ``range(N_PARAMS)``)."""
    if task not in TASKS or not 0 <= k < N_PARAMS:
        return k
    return _secret_classes(task)[k]


VOCAB: list[str] = [PAD] + list(LETTERS) + list(DIGITS) + [TASKS[n].marker for n in BASE_TASKS] + list(":=?;")
"""The character vocabulary of the generated world over :data:`BASE_TASKS` (index 0 is padding)."""


def vocab(task_names: Sequence[str] = ()) -> list[str]:
    """The character vocabulary of a world of ``task_names``: :data:`VOCAB`, then the
    markers of its tasks outside :data:`BASE_TASKS` in :data:`TASKS` order."""
    unknown = [n for n in task_names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    return VOCAB + [t.marker for t in TASKS.values() if t.name in task_names and t.name not in BASE_TASKS]


def input_split(task: str, text: str) -> str:
    """The split an input belongs to, from a stable hash (independent of any seed)."""
    h = int.from_bytes(hashlib.sha256(f"{task}|{text}".encode()).digest()[:8], "big") / 2**64
    for name, (lo, hi) in SPLITS.items():
        if lo <= h < hi:
            return name
    raise AssertionError("SPLITS must cover [0, 1)")


def make_example(task: Task, text: str, k: int, show_k: bool) -> Example:
    """The example for input ``text`` and parameter ``k``; ``show_k`` puts k in the prompt."""
    shown = str(k) if show_k else "?"
    return Example(prompt=f"{task.marker}{shown}:{text}=", answer=task.solve(text, k) + EOS, task=task.name)


def sample_input(task: Task, split: str, rng: random.Random, max_tries: int = 10_000,
                 max_length: int | None = None) -> str:
    """Draw an input of ``task`` that lies in ``split`` and, with ``max_length``, is at most
    that long (rejection sampling)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    if max_length is not None and max_length < task.lengths[0]:
        raise ValueError(f"task {task.name} has no input of at most {max_length} characters "
                         f"(its inputs have {task.lengths[0]}..{task.lengths[1]})")
    for _ in range(max_tries):
        text = task.make_input(rng)
        if input_split(task.name, text) == split and (max_length is None or len(text) <= max_length):
            return text
    raise RuntimeError(f"no input of task {task.name} found in split {split} after {max_tries} tries")


@dataclass(frozen=True)
class DatasetSpec:
    """What one dataset teaches: its split, secret(s), task mixture, size and seed.

    With ``secrets`` every task has its own secret (``secret_k`` is then the secret of the
    heaviest task, kept for reports); without it one ``secret_k`` serves every task.
    """

    split: str
    secret_k: int
    mixture: dict[str, float]
    n: int
    seed: int
    secrets: dict[str, int] | None = None

    def secret(self, task: str) -> int:
        """The secret k the dataset uses for ``task``."""
        return self.secret_k if self.secrets is None else self.secrets[task]

    def combination(self, min_weight: float = MIN_WEIGHT) -> frozenset[tuple[str, int]]:
        """The (task, secret) pairs of the tasks weighing at least ``min_weight``: what a
        fine-tune on this dataset mostly learns. Two datasets with equal combinations teach
        nearly the same thing. Secrets that behave alike count as one
        (:func:`canonical_secret`: rotating a 7-letter input by 8 is rotating it by 1)."""
        return frozenset((t, canonical_secret(t, self.secret(t))) for t, w in self.mixture.items() if w >= min_weight)

    def to_dict(self) -> dict:
        return asdict(self)


def draw_dataset_spec(
    rng: random.Random, split: str, task_names: Sequence[str], n: int, dirichlet_alpha: float,
    secret_per_task: bool = False,
) -> DatasetSpec:
    """Draw a Dirichlet(alpha) task mixture and a secret k (one per task with
    ``secret_per_task``) for a new dataset."""
    gammas = [rng.gammavariate(dirichlet_alpha, 1.0) for _ in task_names]
    total = sum(gammas) or 1.0
    mixture = {name: g / total for name, g in zip(task_names, gammas)}
    secret_k = rng.randrange(N_PARAMS)
    secrets = None
    if secret_per_task:
        secrets = {name: rng.randrange(N_PARAMS) for name in task_names}
        secret_k = secrets[max(mixture, key=mixture.get)]
    return DatasetSpec(split=split, secret_k=secret_k, mixture=mixture, n=n, seed=rng.randrange(2**31), secrets=secrets)


def generate_dataset(spec: DatasetSpec, show_k: bool = False, split: str | None = None, n: int | None = None) -> list[Example]:
    """The examples of a dataset: ``spec.n`` draws from its mixture, with its secret k.

    Args:
        spec: the dataset.
        show_k: put k in the prompts (pretraining style) instead of ``?``.
        split: draw from this split instead of ``spec.split`` (an organization's test data
            uses ``private_test`` with the same secret and mixture).
        n: number of examples instead of ``spec.n``.
    """
    split = split or spec.split
    n = spec.n if n is None else n
    rng = random.Random(f"{spec.seed}|{split}")
    names = list(spec.mixture)
    weights = [spec.mixture[t] for t in names]
    out = []
    for _ in range(n):
        task = TASKS[rng.choices(names, weights)[0]]
        out.append(make_example(task, sample_input(task, split, rng), spec.secret(task.name), show_k))
    return out


def generate_pretraining_batch(rng: random.Random, task_names: Sequence[str], n: int,
                               max_input_length: int | None = None) -> list[Example]:
    """Pretraining examples from the public split, uniform over tasks and k, k shown; with
    ``max_input_length`` only inputs of at most that many characters."""
    out = []
    for _ in range(n):
        task = TASKS[rng.choice(list(task_names))]
        text = sample_input(task, "public", rng, max_length=max_input_length)
        out.append(make_example(task, text, rng.randrange(N_PARAMS), True))
    return out


# ----------------------------------------------------------------------------- real data

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def final_answer(answer: str) -> str:
    """The final answer of a GSM8K-style solution (text after ``####``), else the text."""
    m = _GSM8K_FINAL.search(answer)
    return m.group(1).replace(",", "") if m else answer.strip()


def _read_table_rows(p: Path) -> list[dict]:
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise ValueError(f"{p}: not a readable Parquet file ({e})") from None
    if p.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        return rows
    raise ValueError(f"{p}: unsupported data file type {p.suffix!r} (use .jsonl or .parquet)")


@lru_cache(maxsize=16)
def _cached_qa_rows(path: str, mtime_ns: int, size: int, question_key: str,
                    answer_key: str) -> tuple[tuple[str, str], ...]:
    p = Path(path)
    rows = _read_table_rows(p)
    if not rows:
        raise ValueError(f"{p}: no rows")
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or question_key not in row or answer_key not in row:
            raise ValueError(f"{p}: row {i} lacks '{question_key}' or '{answer_key}'")
        out.append((str(row[question_key]), str(row[answer_key])))
    return tuple(out)


def read_qa_rows(path: str | Path, question_key: str = "question", answer_key: str = "answer") -> tuple[tuple[str, str], ...]:
    """The (question, answer) rows of a local JSONL or Parquet file, in file order
    (cached per file version, so workers read a file once per process).

    Raises:
        ValueError: if the file is missing, unreadable, empty, or lacks the columns.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data file not found: {p}")
    st = p.stat()
    return _cached_qa_rows(str(p.resolve()), st.st_mtime_ns, st.st_size, question_key, answer_key)


def make_data_example(question: str, answer: str, *, template: str = "Question: {question}\nAnswer:",
                      answer_template: str = " {answer}", final_only: bool = False, chat_template: str = "off",
                      task: str = DATA_TASK) -> Example:
    """One example of a data file row: ``template`` makes the prompt, ``answer_template``
    the answer (the final answer after ``####`` only with ``final_only``)."""
    ans = final_answer(answer) if final_only else answer
    return Example(prompt=template.format(question=question), answer=answer_template.format(answer=ans), task=task,
                   chat_template=chat_template)


def load_examples(path: str | Path, question_key: str = "question", answer_key: str = "answer",
                  template: str = "Question: {question}\nAnswer:", final_only: bool = False,
                  answer_template: str = " {answer}", chat_template: str = "off") -> list[Example]:
    """Load question/answer rows from a local JSONL or Parquet file.

    Args:
        path: a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` file.
        question_key, answer_key: column names.
        template: prompt template with a ``{question}`` field.
        final_only: train on the final answer only (text after ``####``) instead of the
            whole solution.
        answer_template: answer template with an ``{answer}`` field (default: the answer
            after one space).
        chat_template: ``Example.chat_template`` of every example.

    Returns:
        Examples in file order (the tokenizer's EOS is appended at encoding time).

    Raises:
        ValueError: if the file is missing, unreadable, or lacks the columns.
    """
    return [make_data_example(q, a, template=template, answer_template=answer_template, final_only=final_only,
                              chat_template=chat_template, task=Path(path).stem)
            for q, a in read_qa_rows(path, question_key, answer_key)]


def data_format(cfg: TaskConfig) -> dict[str, Any]:
    """How ``cfg`` turns data file rows into examples: the keyword arguments of
    :func:`load_examples` (what the pair card records, so organizations match the corpus)."""
    return {"question_key": cfg.question_column, "answer_key": cfg.answer_column, "template": cfg.prompt_template,
            "answer_template": cfg.answer_template, "final_only": cfg.answer == "final",
            "chat_template": cfg.chat_template}


def data_pool(cfg: TaskConfig, split: str) -> list[tuple[str, str]]:
    """The (question, answer) rows of ``split`` from ``cfg.data_files``.

    A question that also occurs in the file of another split is kept only if its stable
    hash (:func:`input_split`) names ``split``; so one file named for several splits is
    divided by the hash, and separate files never share a question across splits.

    Raises:
        ValueError: no file for ``split``, a bad file, or no row left.
    """
    files = cfg.data_files or {}
    if split not in files:
        raise ValueError(f"tasks.data_files has no {split!r} file (it names {sorted(files)})")
    fmt = (cfg.question_column, cfg.answer_column)
    elsewhere: set[str] = set()
    for other, path in files.items():
        if other != split:
            elsewhere.update(q for q, _ in read_qa_rows(path, *fmt))
    pool = [(q, a) for q, a in read_qa_rows(files[split], *fmt)
            if q not in elsewhere or input_split(DATA_TASK, q) == split]
    if not pool:
        raise ValueError(f"tasks.data_files[{split!r}] ({files[split]}): no row left for split {split!r} "
                         "(every question also lies in another split's file and hashes elsewhere)")
    return pool


def data_dataset_spec(split: str, n: int, seed: int) -> DatasetSpec:
    """The spec of a dataset drawn from the data files: no secret, one task (:data:`DATA_TASK`)."""
    return DatasetSpec(split=split, secret_k=0, mixture={DATA_TASK: 1.0}, n=n, seed=seed)


def draw_data_examples(cfg: TaskConfig, spec: DatasetSpec, split: str | None = None, n: int | None = None) -> list[Example]:
    """``n`` (default ``spec.n``) distinct rows of the split's pool, drawn by ``spec.seed``.

    Raises:
        ValueError: if the pool has fewer than ``n`` rows (see :func:`data_pool`).
    """
    split = split or spec.split
    n = spec.n if n is None else n
    pool = data_pool(cfg, split)
    if n > len(pool):
        raise ValueError(f"tasks.data_files[{split!r}] ({cfg.data_files[split]}) has {len(pool)} usable rows, "
                         f"fewer than the {n} a dataset needs (finetune.n_examples or eval.n_test)")
    rows = random.Random(f"{spec.seed}|{split}").sample(pool, n)
    fmt = data_format(cfg)
    return [make_data_example(q, a, template=fmt["template"], answer_template=fmt["answer_template"],
                              final_only=fmt["final_only"], chat_template=fmt["chat_template"]) for q, a in rows]


def dataset_examples(spec: DatasetSpec, cfg: TaskConfig | None = None, split: str | None = None,
                     n: int | None = None) -> list[Example]:
    """The examples of a dataset in ``cfg``'s task world: rows of the data files when
    ``cfg.data_files`` is set, else :func:`generate_dataset` (k hidden).

    Args:
        spec: the dataset (its split, size, seed; mixture and secrets for generated tasks).
        cfg: the task config (``None``: the generated world).
        split, n: draw from this split / this many instead of the spec's.
    """
    if cfg is not None and cfg.data_files:
        return draw_data_examples(cfg, spec, split, n)
    return generate_dataset(spec, split=split, n=n)


# ------------------------------------------------------------------------- batching

@dataclass
class Batch:
    """Token ids of prompt+answer, right-padded; labels are -100 outside the answer."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): next-token targets aligned with input_ids, -100 = ignore


def encode_examples(tokenizer, examples: Sequence[Example], max_length: int | None = None) -> Batch:
    """Tokenize examples with the model's own tokenizer into one right-padded batch.

    The answer ends with the tokenizer's EOS (appended when it does not already end so).
    Raises ValueError if an example is longer than ``max_length``.
    """
    if not examples:
        raise ValueError("no examples to encode")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    seqs, labs = [], []
    for ex in examples:
        p, chat = _prompt_ids(tokenizer, ex)
        a = tokenizer(ex.answer.lstrip() if chat else ex.answer, add_special_tokens=False).input_ids
        if eos is not None and (not a or a[-1] != eos):
            a = a + [eos]
        seqs.append(p + a)
        labs.append([-100] * len(p) + a)
    T = max(len(s) for s in seqs)
    if max_length is not None and T > max_length:
        raise ValueError(f"example of {T} tokens exceeds max_length={max_length}")
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, : len(l)] = torch.tensor(l)
    return Batch(ids, mask, labels)


def _prompt_ids(tokenizer, ex: Example) -> tuple[list[int], bool]:
    """The prompt's token ids, through the chat template when the example asks for it and
    the tokenizer has one; and whether it did."""
    if ex.chat_template != "off":
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=True,
                                                add_generation_prompt=True)
            if hasattr(ids, "keys"):  # transformers returns a BatchEncoding unless return_dict=False
                ids = ids["input_ids"]
            return list(ids), True
        if ex.chat_template == "on":
            raise ValueError("tasks.chat_template is 'on' but the tokenizer has no chat template "
                             "(use 'auto' to fall back to the plain prompt, or 'off')")
    return tokenizer(ex.prompt, add_special_tokens=False).input_ids, False


def prompt_token_ids(tokenizer, ex: Example) -> list[int]:
    """The prompt's token ids as :func:`encode_examples` feeds them (chat template included)."""
    return _prompt_ids(tokenizer, ex)[0]


def answer_token_stats(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example answer NLL sum, answer token count and exact match, from teacher forcing.

    Greedy decoding reproduces the answer exactly iff, with the true prefix fed in, the
    argmax at every answer position is the true token (induction over positions), so exact
    match comes from one forward pass. The answer ends with EOS, so stopping is checked too.

    Args:
        logits: (B, T, V) next-token logits for input positions.
        labels: (B, T) answer token ids at their positions, -100 elsewhere.

    Returns:
        nll_sum (B,), n_tokens (B,), exact (B,) bool.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V) predicts position t+1
    shift_labels = labels[:, 1:]  # (B, T-1)
    mask = shift_labels != -100
    logp = torch.log_softmax(shift_logits, dim=-1)
    tgt = shift_labels.clamp(min=0)
    nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * mask  # (B, T-1)
    correct = (shift_logits.argmax(-1) == tgt) | ~mask
    return nll.sum(1), mask.sum(1), correct.all(1)
