"""What the stages after the corpus share: where the translator lives, the one subset split,
the translator's settings, its training on the split, and the held-out rows it is scored on.

`jobs/train_translator.py`, `jobs/tune_translator.py`, `jobs/eval_translator.py`,
`jobs/evaluate.py`, `jobs/collaborate.py` and the benchmarks use these instead of importing
each other. Plain functions of an `ExperimentConfig` and a `Corpus`: no ray. A mistake the
user can fix (a missing checkpoint, a fingerprint mismatch, bad settings) raises
``ValueError``; the jobs show it as a one-line error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from gt_ray import storage, tasks
from gt_ray.config import ExperimentConfig, LoraSpec
from gt_ray.corpus import Corpus, split_by_subset
from gt_ray.shadow import is_tiny_only
from gt_ray.evaluate import score_update
from gt_ray.models import load_card_side
from gt_ray.translator.checkpoint import load_translator
from gt_ray.translator.config import TrainConfig, TranslatorConfig
from gt_ray.translator.function_loss import shadow_objective
from gt_ray.translator.train import train_translator
from gt_ray.vector_metrics import vector_metrics

logger = logging.getLogger(__name__)

TRANSLATOR_DIR = "translator"
"""The translator checkpoint's directory inside ``work_dir``."""
BEST_CONFIG_FILE = "translator_best.yaml"
"""Written by ``gt-ray translator tune`` into ``work_dir``; read by ``gt-ray translator train``."""
N_TEST = 200
"""Test examples per held-out test subset (`held_out`)."""


# ----------------------------------------------------------------------------- locations


def translator_seeds(cfg: ExperimentConfig) -> list[int]:
    """The translator's training seeds (``translator.seeds``, else ``translator.train.seed``);
    the first is the served one."""
    return list(cfg.translator.seeds) if cfg.translator.seeds else [cfg.translator.train.seed]


def translator_dir(cfg: ExperimentConfig, seed: int | None = None) -> str | Path:
    """``{work_dir}/translator`` for the first (served) seed, ``{work_dir}/translator-seed{S}``
    for another: a ``Path`` for a local ``work_dir``, else the URI."""
    name = TRANSLATOR_DIR if seed is None or seed == translator_seeds(cfg)[0] else f"{TRANSLATOR_DIR}-seed{seed}"
    location = storage.join(storage.absolute(cfg.work_dir), name)
    return location if storage.is_uri(location) else Path(location)


def translator_dir_from(work: Path) -> Path:
    """The translator checkpoint directory inside a local work directory."""
    return work / TRANSLATOR_DIR


def best_config_location(cfg: ExperimentConfig) -> str:
    """``translator.best_config``, or ``{work_dir}/translator_best.yaml`` (a path or a URI)."""
    return cfg.translator.best_config or storage.join(storage.absolute(cfg.work_dir), BEST_CONFIG_FILE)


# ----------------------------------------------------------------------------- corpus and split


def load_corpus_and_translator(cfg: ExperimentConfig, device: str | torch.device = "cpu"):
    """The finished corpus and the trained (first-seed, served) translator checkpoint,
    checked against each other.

    Returns:
        (Corpus, Translator in eval mode).

    Raises:
        ValueError: a missing or unfinished corpus or checkpoint, or a checkpoint for
            other layouts (fingerprints).
    """
    corpus = Corpus(cfg.corpus_dir)
    return corpus, load_translator(translator_dir(cfg), expected_fingerprints=corpus.fingerprints, device=device,
                                   tiny=card_tiny_once(corpus))


def load_translators(cfg: ExperimentConfig, corpus: Corpus, device: str | torch.device = "cpu") -> dict:
    """Every training seed's checkpoint (:func:`translator_seeds`), in seed order.

    Returns:
        {seed: Translator in eval mode}.

    Raises:
        ValueError: a missing checkpoint (run `gt-ray translator train`) or one for other layouts.
    """
    tiny = card_tiny_once(corpus)  # every seed's behaviour encoder shares one TinyLM
    return {s: load_translator(translator_dir(cfg, s), expected_fingerprints=corpus.fingerprints, device=device,
                               tiny=tiny)
            for s in translator_seeds(cfg)}


def card_tiny_once(corpus: Corpus) -> Callable[[], Any]:
    """Loads the card's TinyLM on the first call only (``input: behaviour`` checkpoints need it;
    the encoders plug their updates in per call and write nothing into it, so they can share it)."""
    loaded: list = []

    def tiny():
        if not loaded:
            loaded.append(load_card_side(corpus.card(), "tiny"))
        return loaded[0]
    return tiny


def subset_split(cfg: ExperimentConfig, corpus: Corpus) -> tuple[list[int], list[int], list[int]]:
    """Train, validation and test ids of the *paired* subsets: the one split every stage and
    method uses (baselines fit on its training side; the held-out table scores its test side).

    Raises:
        ValueError: too few subsets for the configured fractions.
    """
    return split_by_subset(corpus.subset_ids, cfg.translator.val_fraction, cfg.translator.test_fraction, cfg.seed)


def translator_split(cfg: ExperimentConfig, corpus: Corpus) -> tuple[list[int], list[int], list[int]]:
    """The translator's train, validation and test ids: the paired split
    (:func:`subset_split`, unchanged by TinyLM-only subsets) plus the TinyLM-only subsets,
    split by subset with the same fractions and seed.

    Raises:
        ValueError: too few subsets of a kind for the configured fractions.
    """
    paired = subset_split(cfg, corpus)
    if not corpus.tiny_only_ids:
        return paired
    only = split_by_subset(corpus.tiny_only_ids, cfg.translator.val_fraction, cfg.translator.test_fraction, cfg.seed)
    return tuple(sorted(p + o) for p, o in zip(paired, only))  # type: ignore[return-value]


def load_rows(corpus: Corpus, subset_ids: list[int]) -> dict:
    """Rows of paired and TinyLM-only subsets together, with ``paired`` (N,) bool; a
    TinyLM-only row's ``llm`` is zeros (a placeholder: the translator masks it)."""
    ids_paired = [i for i in subset_ids if not is_tiny_only(i)]
    ids_only = [i for i in subset_ids if is_tiny_only(i)]
    paired = corpus.load(ids_paired)
    paired["paired"] = torch.ones(paired["step"].shape[0], dtype=torch.bool)
    if not ids_only:
        return paired
    only = corpus.load(ids_only, sides=("tiny",))
    n_paired, n = paired["step"].shape[0], only["step"].shape[0]
    only["paired"] = torch.zeros(n, dtype=torch.bool)
    # one allocation for the LLM column, not a zeros block and its concatenated copy: at 2,000
    # TinyLM-only subsets that copy was ~3 GB more at peak
    llm = torch.zeros((n_paired + n, *corpus.llm_shape), dtype=paired["llm"].dtype)
    llm[:n_paired] = paired.pop("llm")
    rows = {k: torch.cat([paired[k], only[k]]) for k in paired}
    rows["llm"] = llm
    return rows


def load_split(cfg: ExperimentConfig, corpus: Corpus) -> tuple[dict, dict, list[int], list[int]]:
    """The translator's training and validation rows (:func:`load_rows`) and their subset
    ids (:func:`translator_split`; the test subsets stay unread)."""
    train_ids, val_ids, _ = translator_split(cfg, corpus)
    return load_rows(corpus, train_ids), load_rows(corpus, val_ids), train_ids, val_ids


def final_rows(data: dict) -> dict:
    """Keep each subset's last snapshot, ordered by subset id."""
    last = {}
    for i, (s, st) in enumerate(zip(data["subset_id"].tolist(), data["step"].tolist())):
        if s not in last or st > data["step"][last[s]]:
            last[s] = i
    idx = torch.tensor([last[s] for s in sorted(last)])
    return {k: v[idx] for k, v in data.items()}


# ----------------------------------------------------------------------------- settings and training


def apply_best_settings(cfg: ExperimentConfig, best: dict[str, Any], source: str = "the best config"
                        ) -> tuple[TranslatorConfig, TrainConfig]:
    """The config's translator model and train sections with a best YAML's ``model`` and
    ``train`` values over them (what `gt-ray translator tune` writes; layouts not filled in).

    Raises:
        ValueError: keys other than ``model``/``train``, or settings those sections refuse,
            named with ``source``.
    """
    if set(best) - {"model", "train"}:
        raise ValueError(f"translator settings from {source}: unknown sections {sorted(set(best) - {'model', 'train'})}")
    try:
        return (dataclasses.replace(cfg.translator.model, **best.get("model", {})),
                dataclasses.replace(cfg.translator.train, **best.get("train", {})))
    except (TypeError, ValueError) as e:
        raise ValueError(f"translator settings from {source}: {e}") from None


def resolve_settings(cfg: ExperimentConfig, corpus: Corpus) -> tuple[TranslatorConfig, TrainConfig, dict[str, Any]]:
    """The model and train config: config values, overridden by the sweep's best YAML, with
    the corpus' layouts.

    Returns:
        (model config, train config, {"settings_source": "config" or the best YAML's location}).

    Raises:
        ValueError: a ``translator.best_config`` that does not exist, or bad settings.
    """
    best_path = best_config_location(cfg)
    source, best = "config", {}
    if storage.is_file(best_path):
        best, source = yaml.safe_load(storage.read_text(best_path)) or {}, str(best_path)
    elif cfg.translator.best_config:
        raise ValueError(f"translator.best_config {best_path} does not exist (run `gt-ray translator tune`)")
    (L_t, d_t), (L_l, d_l) = corpus.tiny_shape, corpus.llm_shape
    model, train_cfg = apply_best_settings(cfg, best, source)
    try:
        model_cfg = model.with_layouts(d_tiny=d_t, L_tiny=L_t, d_llm=d_l, L_llm=L_l)
    except (TypeError, ValueError) as e:
        raise ValueError(f"translator settings from {source}: {e}") from None
    return model_cfg, train_cfg, {"settings_source": source}


def function_objective(corpus: Corpus, train_ids: list[int], val_ids: list[int], train_cfg: TrainConfig,
                       device: str | torch.device = "cpu"):
    """The card's LLM, frozen, with the training and validation subsets' examples
    (a `gt_ray.translator.function_loss.FunctionObjective`)."""
    card = corpus.card()  # from the manifest: works for a corpus at a URI too
    llm = load_card_side(card, "llm")
    llm.model.to(device)
    lora = LoraSpec(**card.lora)
    return shadow_objective(corpus, llm, lora.alpha / lora.rank, train_ids, val_ids, train_cfg.examples_per_subset)


def fit(tr: dict, va: dict, train_ids: list[int], val_ids: list[int], corpus: Corpus, model_cfg: TranslatorConfig,
        train_cfg: TrainConfig, features_cache: str | Path | None = None, **kwargs):
    """``train_translator`` on the split, scored by what the update does (validation answer NLL).

    Args:
        tr, va: training and validation rows (`load_split`).
        train_ids, val_ids: their subset ids.
        corpus: the corpus (its card names the LLM).
        model_cfg, train_cfg: the settings (`resolve_settings`).
        features_cache: ``input: behaviour``: a directory that keeps the rows' behaviour
            tokens (`encode_rows`), so Tune trials and training seeds compute them once.
        **kwargs: passed to `gt_ray.translator.train.train_translator` (device, on_epoch,
            prepare_model, prepare_train_loader).

    Returns:
        (translator, history) as `train_translator` returns them.
    """
    device = kwargs.get("device", "cpu")
    objective = function_objective(corpus, train_ids, val_ids, train_cfg, device)
    x_tr, x_va, encoder = tr["tiny"], va["tiny"], None
    if model_cfg.input == "behaviour":  # the translator reads what each update makes the TinyLM do
        encoder = behaviour_input(corpus, model_cfg, train_ids)
        x_tr, x_va = encode_rows(encoder, x_tr, cache_dir=features_cache), encode_rows(encoder, x_va,
                                                                                       cache_dir=features_cache)
        model_cfg = model_cfg.with_layouts(L_tiny=encoder.shape[0], d_tiny=encoder.shape[1],
                                           L_llm=model_cfg.L_llm, d_llm=model_cfg.d_llm)
    return train_translator(x_tr, tr["llm"], x_va, va["llm"], train_cfg, model_cfg,
                            train_subsets=tr["subset_id"], val_subsets=va["subset_id"], function=objective,
                            train_paired=tr.get("paired"), val_paired=va.get("paired"), input_encoder=encoder,
                            **kwargs)


PROBE_EXAMPLES_PER_SUBSET = 4
"""``input: behaviour``: public examples of each training subset in the probe-prompt pool."""


def behaviour_input(corpus: Corpus, model_cfg: TranslatorConfig, train_ids: list[int], seed: int = 0,
                    tiny=None):
    """The input encoder of ``input: behaviour`` (`gt_ray.translator.behaviour.BehaviourInput`):
    the card's TinyLM (``tiny`` when the caller has it loaded already; the encoder writes
    nothing into it), ``model_cfg.behaviour_prompts`` probe prompts drawn (``seed``) from
    the first `PROBE_EXAMPLES_PER_SUBSET` public examples of each training subset.

    Raises:
        ValueError: too few distinct prompts, or ``behaviour_rows`` that does not divide the
            behaviour matrix.
    """
    from gt_ray.translator.behaviour import BehaviourInput, draw_probe_prompts

    card = corpus.card()
    specs, world = corpus.subset_specs(), corpus.task_config()
    pool = [ex for i in train_ids for ex in tasks.dataset_examples(specs[i], world)[:PROBE_EXAMPLES_PER_SUBSET]]
    lora = LoraSpec(**card.lora)
    return BehaviourInput(tiny if tiny is not None else load_card_side(card, "tiny"), draw_probe_prompts(pool, model_cfg.behaviour_prompts, seed),
                          model_cfg.behaviour_steps, model_cfg.behaviour_rows, lora.alpha / lora.rank)


def features_cache_dir(cfg: ExperimentConfig) -> Path:
    """Where ``input: behaviour`` keeps computed behaviour tokens: ``{cache_dir}/behaviour``
    (one safetensors file per distinct set of rows and encoder; safe to delete)."""
    return Path(cfg.cache_dir).expanduser() / "behaviour"


def encode_rows(encoder, x: torch.Tensor, chunk: int = 256, cache_dir: str | Path | None = None) -> torch.Tensor:
    """``encoder`` over raw updates ``(N, L, d)`` in chunks, with a progress line per ~10%.

    With ``cache_dir``, the result is kept there under ``encoder.cache_key(x)`` and read back
    by the next call with the same rows and encoder; an exclusive lock per key makes
    concurrent callers (Tune trials, training seeds) wait for the first instead of all
    computing it. An unreadable cached file is computed and written again."""
    if cache_dir is None:
        return _encode_rows(encoder, x, chunk)
    import fcntl

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{encoder.cache_key(x)}.safetensors"
    with open(path.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                out = load_file(str(path))["features"]
                if out.shape == (x.shape[0], *encoder.shape):
                    logger.info("behaviour inputs: %d updates read from %s", x.shape[0], path)
                    return out
            except (SafetensorError, OSError, KeyError) as e:
                logger.warning("behaviour inputs: unreadable cache file %s (%s): computing again", path, e)
        out = _encode_rows(encoder, x, chunk)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"features": out.contiguous()}, str(tmp))
        tmp.replace(path)
        return out


def _encode_rows(encoder, x: torch.Tensor, chunk: int) -> torch.Tensor:
    out, step = [], max(chunk, (x.shape[0] // 10 // chunk + 1) * chunk)
    for c in range(0, x.shape[0], chunk):
        out.append(encoder(x[c:c + chunk]))
        if (c + chunk) % step == 0 or c + chunk >= x.shape[0]:
            logger.info("behaviour inputs: %d / %d updates", min(c + chunk, x.shape[0]), x.shape[0])
    return torch.cat(out)


# ----------------------------------------------------------------------------- held-out scoring


def fit_baselines(rows: dict, baselines: Mapping[str, Any]) -> dict[str, Any]:
    """Fit each baseline (`gt_ray.baselines`) on corpus rows (their TinyLM and LLM vectors and
    subset ids); returns the same mapping, fitted."""
    for baseline in baselines.values():
        baseline.fit(rows["tiny"], rows["llm"], rows["subset_id"])
    return dict(baselines)


def held_out(cfg: ExperimentConfig, corpus: Corpus, n_test: int = N_TEST):
    """The training rows, the test subsets' final rows, their test examples and the LLM.

    Returns:
        (train rows, test final rows, one test list per test subset, LoadedModel of the
        card's LLM, its LoRA scale alpha / r, test subset ids, whether each test subset's
        combination is taught by some training subset)
    """
    card = corpus.card()  # from the manifest: works for a corpus at a URI too
    train_ids, _, test_ids = subset_split(cfg, corpus)
    tr = corpus.load(train_ids)
    te_final = final_rows(corpus.load(test_ids))
    specs = corpus.subset_specs()
    world = corpus.task_config()  # generated tasks, or the corpus' data files
    seen_combos = {specs[i].combination() for i in train_ids}
    tests, seen = [], []
    for sid in te_final["subset_id"].tolist():
        spec = specs[sid]  # the subset's own task (secrets, mixture) on inputs no shadow fine-tune saw
        tests.append(tasks.dataset_examples(dataclasses.replace(spec, split="private_test"), world, n=n_test))
        seen.append(spec.combination() in seen_combos)
    lora = LoraSpec(**card.lora)
    return tr, te_final, tests, load_card_side(card, "llm"), lora.alpha / lora.rank, test_ids, seen


def score_subset(preds: dict, true: torch.Tensor, test: list, llm, scale: float) -> dict:
    """One held-out test subset's row of :func:`score_predictions`.

    Args:
        preds: {method: (L_llm, d_llm) predicted update for this subset}.
        true: (L_llm, d_llm) the subset's own LLM update.
        test: its test examples.
        llm: the card's LLM (a `gt_ray.models.LoadedModel`); each update is applied on
            top of the card's init, so the result does not depend on what ``llm`` held.
        scale: its LoRA scale alpha / r.

    Returns:
        {method: {"nll": float, "accuracy": float, "vector": vector metrics or None
        (``true``/``base``)}}.
    """
    out = {}
    for name, p in preds.items():
        s = score_update(llm, p, test)
        vector = vector_metrics(p, true, llm.layout, llm.init, scale) if name not in ("true", "base") else None
        out[name] = {"nll": s.nll, "accuracy": s.accuracy, "vector": vector}
    return out


def collect_subset_rows(methods, subsets: list[dict]) -> dict:
    """{method: {"nll": [...], "accuracy": [...], "vector": [...]}} from one
    :func:`score_subset` result per subset, in subset order (``vector`` stays empty for
    ``true``/``base``)."""
    rows = {name: {"nll": [], "accuracy": [], "vector": []} for name in methods}
    for subset in subsets:
        for name, r in subset.items():
            rows[name]["nll"].append(r["nll"])
            rows[name]["accuracy"].append(r["accuracy"])
            if r["vector"] is not None:
                rows[name]["vector"].append(r["vector"])
    return rows


def score_predictions(preds: dict, va_final: dict, tests: list, llm, scale: float,
                      on_subset: Callable[[int, int], None] | None = None) -> dict:
    """Answer NLL / accuracy of the LLM with each predicted update on each subset's test
    examples, and vector metrics against the true update (not for ``true``/``base``):
    :func:`score_subset` for each subset in turn.

    Args:
        preds: {method: (S, L_llm, d_llm) predicted updates}, one row per test subset.
        va_final: the test subsets' final rows (`final_rows`), whose "llm" is the true update.
        tests: one example list per test subset.
        llm: the card's LLM (a `gt_ray.models.LoadedModel`).
        scale: its LoRA scale alpha / r.
        on_subset: called as on_subset(i, n) after subset i of n (progress).

    Returns:
        {method: {"nll": [...], "accuracy": [...], "vector": [...]}}, one entry per subset.
    """
    subsets = []
    for i, test in enumerate(tests):
        subsets.append(score_subset({name: p[i] for name, p in preds.items()}, va_final["llm"][i], test, llm, scale))
        if on_subset is not None:
            on_subset(i, len(tests))
    return collect_subset_rows(preds, subsets)
