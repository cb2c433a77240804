"""An organization's private data: a local data file or, at the tiny scale, a generated
dataset, given as a :class:`gt_ray.tasks.DatasetSpec` or as the ``generated:SPEC`` text
that ``gt-ray org ... --data`` takes.

Data files are ``.jsonl``/``.parquet`` files with ``question``/``answer`` columns
(:func:`gt_ray.tasks.load_examples`; a card built from data files names the columns,
prompt and answer templates and chat-template mode of its corpus in
``recipe["data_format"]``, and the organization's rows are read the same way).

A generated dataset as text::

    generated:k=3,mix=caesar:0.5/add:0.5[,split=private_train][,n=256][,seed=0]

``k`` is the dataset's secret task parameter (0..9), ``mix`` its task mixture (``task:weight``
pairs joined by ``/``; a bare task name weighs 1; weights are normalized), ``split`` one of
the private splits (an organization's data is private; ``public`` is refused), ``n`` the
number of examples (default ``FinetuneConfig.n_examples``) and ``seed`` the generator seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gt_ray import tasks
from gt_ray.config import FinetuneConfig

if TYPE_CHECKING:
    from gt_ray.models import PairCard

GENERATED_PREFIX = "generated:"
"""``--data`` values starting with this describe a generated dataset, not a file."""


def parse_generated_spec(text: str) -> tasks.DatasetSpec:
    """Parse ``k=3,mix=caesar:0.5/add:0.5,split=private_train,n=256,seed=7`` (prefix optional).

    ``ks=caesar:3/add:7`` gives one secret per task instead (every task of ``mix`` needs one);
    ``k`` then defaults to the secret of the heaviest task.

    Args:
        text: the spec, with or without the ``generated:`` prefix (see the module docstring).

    Returns:
        The :class:`gt_ray.tasks.DatasetSpec` (mixture weights normalized to sum 1).

    Raises:
        ValueError: unknown or repeated keys, a missing ``k`` or ``mix``, an unknown task,
            a bad number, or a split that is not private.
    """
    body = text[len(GENERATED_PREFIX):] if text.startswith(GENERATED_PREFIX) else text
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not value.strip():
            raise ValueError(f"generated data spec {text!r}: expected key=value, got {part!r}")
        if key not in ("split", "k", "ks", "mix", "n", "seed"):
            raise ValueError(f"generated data spec {text!r}: unknown key {key!r} (known: split, k, ks, mix, n, seed)")
        if key in fields:
            raise ValueError(f"generated data spec {text!r}: {key!r} given twice")
        fields[key] = value.strip()
    missing = [k for k in ("k", "mix") if k not in fields and not (k == "k" and "ks" in fields)]
    if missing:
        raise ValueError(f"generated data spec {text!r}: missing {', '.join(missing)} "
                         "(e.g. generated:k=3,mix=caesar:0.5/add:0.5,n=256,seed=7)")
    split = fields.get("split", tasks.PRIVATE_SPLITS[0])
    if split not in tasks.PRIVATE_SPLITS:
        raise ValueError(f"generated data spec {text!r}: split must be one of the private splits "
                         f"{list(tasks.PRIVATE_SPLITS)}, got {split!r}: an organization's data is private")
    secrets = None
    if "ks" in fields:
        secrets = {}
        for item in fields["ks"].split("/"):
            name, _, value = item.partition(":")
            secrets[name.strip()] = _spec_int(text, f"ks[{name.strip()}]", value)
    given = [(f"ks[{t}]", v) for t, v in (secrets or {}).items()]
    if "k" in fields:
        given.append(("k", _spec_int(text, "k", fields["k"])))
    for name, k in given:
        if not 0 <= k < tasks.N_PARAMS:
            raise ValueError(f"generated data spec {text!r}: {name} must be in 0..{tasks.N_PARAMS - 1}, got {k}")
    n = _spec_int(text, "n", fields.get("n", str(FinetuneConfig.n_examples)))
    if n < 1:
        raise ValueError(f"generated data spec {text!r}: n must be >= 1, got {n}")
    seed = _spec_int(text, "seed", fields.get("seed", "0"))
    mixture: dict[str, float] = {}
    for item in fields["mix"].split("/"):
        name, _, weight = item.partition(":")
        name = name.strip()
        if name not in tasks.TASKS:
            raise ValueError(f"generated data spec {text!r}: unknown task {name!r}; known: {sorted(tasks.TASKS)}")
        if name in mixture:
            raise ValueError(f"generated data spec {text!r}: task {name!r} listed twice in mix")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"generated data spec {text!r}: bad weight {weight!r} for task {name!r}") from None
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"generated data spec {text!r}: weight of {name!r} must be > 0, got {weight!r}")
        mixture[name] = w
    if secrets is not None and set(secrets) != set(mixture):
        raise ValueError(f"generated data spec {text!r}: ks must give one secret for each task of mix")
    total = math.fsum(mixture.values())
    k = _spec_int(text, "k", fields["k"]) if "k" in fields else secrets[max(mixture, key=mixture.get)]
    return tasks.DatasetSpec(split=split, secret_k=k, mixture={t: w / total for t, w in mixture.items()},
                             n=n, seed=seed, secrets=secrets)


def _spec_int(text: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"generated data spec {text!r}: {key} must be an integer, got {value!r}") from None


def load_org_examples(source: str | Path | tasks.DatasetSpec,
                      data_format: dict[str, Any] | None = None) -> tuple[list[tasks.Example], dict[str, Any]]:
    """Load an organization's data from a file or a generated dataset.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` path, a generated dataset's
            :class:`gt_ray.tasks.DatasetSpec` (its split must be private), or the text
            ``generated:SPEC`` (:func:`parse_generated_spec`; a ``str`` without that prefix
            is a path).
        data_format: how file rows become examples (:func:`gt_ray.tasks.data_format`, the
            pair card's ``recipe["data_format"]``, so the organization's prompts match the
            corpus'); ``None``: :func:`gt_ray.tasks.load_examples`' defaults.

    Returns:
        ``(examples, description)``: the description says what kind of data it was and
        nothing about its content (no file name, no generated spec), since it is written
        into the released vector's metadata.

    Raises:
        ValueError: a missing or unparsable file, missing columns, an unknown extension,
            or a bad or non-private generated spec.
    """
    if isinstance(source, str) and source.startswith(GENERATED_PREFIX):
        source = parse_generated_spec(source)
    if isinstance(source, tasks.DatasetSpec):
        check_org_spec(source)
        return tasks.generate_dataset(source), {"kind": "generated", "split": source.split}
    path = Path(source).expanduser()
    examples = tasks.load_examples(path, **(data_format or {}))
    return examples, {"kind": "file", "format": path.suffix.lstrip(".")}


def check_org_spec(spec: tasks.DatasetSpec) -> None:
    """Refuse a generated dataset that an organization cannot hold.

    Raises:
        ValueError: the split is not one of :data:`gt_ray.tasks.PRIVATE_SPLITS` (an
            organization's data is private), or ``n < 1``.
    """
    if spec.split not in tasks.PRIVATE_SPLITS:
        raise ValueError(f"dataset spec: split must be one of the private splits {list(tasks.PRIVATE_SPLITS)}, "
                         f"got {spec.split!r}: an organization's data is private")
    if spec.n < 1:
        raise ValueError(f"dataset spec: n must be >= 1, got {spec.n}")


def card_data_format(card: PairCard | str | Path) -> dict[str, Any] | None:
    """The card's ``recipe["data_format"]`` (a card built from data files has one), read
    from a card object or, without importing the model stack, from its JSON file."""
    recipe = card.recipe if hasattr(card, "recipe") else read_card_recipe(card)
    fmt = (recipe or {}).get("data_format")
    return dict(fmt) if isinstance(fmt, dict) else None


def read_card_recipe(card_path: str | Path) -> dict[str, Any] | None:
    """The recipe in a card JSON, read without importing the model stack (finetune_org
    checks the whole card); None if absent or unreadable (finetune_org reports that).

    Args:
        card_path: the pair card's JSON file.

    Returns:
        The card's ``recipe`` dict, or ``None``.
    """
    try:
        recipe = json.loads(Path(card_path).read_text()).get("recipe")
    except (OSError, ValueError, AttributeError):
        return None
    return recipe if isinstance(recipe, dict) else None
