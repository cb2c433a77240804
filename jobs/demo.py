"""The main job: the whole Grad-Transformer pipeline at the configured scale.

    gt-ray demo                      # configs/default.yaml on an embedded local Ray cluster
    gt-ray demo --config configs/ci.yaml
    gt-ray demo --rerun eval         # recompute a stage (and what reads its output) after a code change

Stages: prepare the pair (pretraining on the first run) -> shadow corpus on Ray Train ->
Ray Tune sweep -> translator training on Ray Train -> held-out translator evaluation ->
the Serve app (``gt-ray serve``) -> simulated organizations fine-tune locally and submit
over HTTP, the service aggregates the round and exports a PEFT adapter -> evaluation
table (the generated updates come from the service's /v1/translate), ``results.json``
and PNG plots -> the service is shut down.

Caching. :data:`STAGES` declares what each stage's output depends on: config keys (or
whole sections) and the outputs of upstream stages. A stage's fingerprint hashes the
values of those keys and the identity of those outputs (the pair card id, the corpus
manifest's shard hashes, the translator checkpoints' weight hashes); it is recorded with
the values in ``{work_dir}/stages/<stage>.json`` when the stage finishes. A rerun skips a
stage whose fingerprint is unchanged and whose output is still there (``status=cached``),
and otherwise logs what changed (``status=rerun changed=eval.n_test``). A stage whose
upstream produced a different output re-runs (``changed=upstream.translator``); one whose
upstream re-ran to the same output does not. The code version is not part of any
fingerprint (the stamp records the commit that computed the output): after changing code,
``--rerun STAGE``. The stages' own caches stay underneath: the pretrained models
(``cache_dir``), the corpus' finished shards (resumed; cleared first when a key other than
the corpus' size changed, or on ``--rerun corpus``) and the translator checkpoint's key
(ignored on ``--rerun translator``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from gt_ray import storage
from gt_ray.config import ExperimentConfig
from gt_ray.yaml_io import config_hash
from gt_ray.corpus import MANIFEST, completed_subsets, shard_name
from gt_ray.models import PairCard
from gt_ray.pipeline import best_config_location, translator_dir, translator_dir_from, translator_seeds
from gt_ray.translator.checkpoint import load_history, weights_sha256
from jobs import build_corpus, eval_translator, evaluate, prepare_pair, service_round, train_translator, tune_translator
from jobs.common import (CpuMeter, UserError, base_parser, init_ray, kv, load_config, provenance, work_dir,
                         work_location, write_json)

STAMP_DIR = "stages"
"""Where the stage stamps live inside ``work_dir``: ``stages/<stage>.json``."""


@dataclass(frozen=True)
class Stage:
    """What one stage's output depends on."""

    reads: tuple[str, ...]
    """Config keys or sections (dotted, e.g. ``eval`` or ``translator.train.lr``)."""
    ignores: tuple[str, ...] = ()
    """Keys under ``reads`` that change how the stage runs, not what it outputs (threads, workers)."""
    upstream: tuple[str, ...] = ()
    """Stages whose output it reads."""


_TASK_FORMAT = ("tasks.names", "tasks.data_files", "tasks.question_column", "tasks.answer_column",
                "tasks.prompt_template", "tasks.answer_template", "tasks.answer", "tasks.chat_template")
_RECIPE = ("finetune.steps", "finetune.lr", "finetune.batch_size", "finetune.weight_decay", "finetune.n_examples",
           "finetune.snapshot_steps")  # gt_ray.models.recipe_of: the card records them
_SPLIT = ("translator.val_fraction", "translator.test_fraction", "seed")  # gt_ray.pipeline.subset_split
_THREADS = ("finetune.num_threads", "eval.num_threads")
SEARCHED = ("translator.model.d_model", "translator.model.num_layers", "translator.model.dropout",
            "translator.train.lr", "translator.train.batch_size", "translator.train.max_epochs")
"""Translator settings a sweep trial sets itself (max_epochs from ``sweep.max_epochs``)."""

STAGES: dict[str, Stage] = {
    # prepare_pair.load_or_prepare_card: the models' recipes (cached_model_dir) and the card's fine-tune recipe
    "pair": Stage(reads=("pair", "cache_dir", *_TASK_FORMAT, *_RECIPE, "pair.tiny.dtype"),
                  ignores=tuple(f"pair.{side}.{what}.num_threads" for side in ("tiny", "llm")
                                for what in ("pretrain", "heal"))),
    # build_corpus.corpus_worker: plan_corpus (tasks, n_examples, corpus seed and sizes), finetune_pair
    "corpus": Stage(reads=("tasks", "finetune", "corpus.seed", "corpus.n_subsets", "corpus.n_tiny_only",
                           "pair.tiny.dtype", "pair.llm.dtype"),
                    ignores=_THREADS, upstream=("pair",)),
    # tune_translator.tune_trial: load_split, the translator settings a trial does not search, sweep.*
    "sweep": Stage(reads=("sweep", "translator.model", "translator.train", *_SPLIT),
                   ignores=(*SEARCHED, "sweep.cpus_per_trial", "sweep.gpus_per_trial", "sweep.max_concurrent_trials"),
                   upstream=("corpus",)),
    # train_translator.train_seed's key: the effective settings (the sweep's best config overrides the
    # config's, see stage_values: a searched key the sweep sets changes nothing) and the corpus
    "translator": Stage(reads=("translator.model", "translator.train", "translator.seeds", *_SPLIT),
                        upstream=("corpus", "sweep")),
    # eval_translator.evaluate: held_out (the split, N_TEST), every seed's checkpoint
    "translator_eval": Stage(reads=_SPLIT, upstream=("corpus", "translator")),
    # service_round.run_round: draw_org_specs(tasks, eval.n_orgs, eval.seeds[0], finetune), the served checkpoint
    "service_round": Stage(reads=("eval.n_orgs", "eval.seeds", "tasks.names", "tasks.dirichlet_alpha",
                                  "tasks.secret_per_task", "finetune"),
                           ignores=_THREADS, upstream=("pair", "translator")),
    # evaluate.evaluate: organizations (eval, tasks, finetune), baselines on the split, the models' dtypes,
    # every seed's checkpoint (the first through the service, which serves that checkpoint)
    "eval": Stage(reads=("eval", "tasks", "finetune", "pair.tiny.dtype", "pair.llm.dtype", *_SPLIT),
                  ignores=_THREADS, upstream=("corpus", "translator")),
}
GROWS_ONLY = ("corpus.n_subsets", "corpus.n_tiny_only")
"""Corpus keys whose change keeps every finished shard valid (subset i depends only on the seed and i)."""


# ----------------------------------------------------------------------------- fingerprints and stamps


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}``; lists and scalars are leaves."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _under(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def select(values: dict[str, Any], stage: Stage) -> dict[str, Any]:
    """The flat config values ``stage`` reads."""
    return {k: v for k, v in values.items() if _under(k, stage.reads) and not _under(k, stage.ignores)}


def stage_values(name: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """The values of the config keys stage ``name`` reads, as JSON would give them back.

    The translator's settings are the effective ones: the sweep's best config (or
    ``translator.best_config``) overrides the config's, as `gt_ray.pipeline.resolve_settings` does.
    """
    values = flatten(dataclasses.asdict(cfg))
    if name == "translator":
        location = best_config_location(cfg)
        if storage.is_file(location):
            best = yaml.safe_load(storage.read_text(location)) or {}
            values.update(flatten({"translator": {part: best.get(part, {}) for part in ("model", "train")}}))
    return json.loads(json.dumps(select(values, STAGES[name]), sort_keys=True, default=str))


def fingerprint(values: dict[str, Any], upstream: dict[str, Any]) -> str:
    return config_hash({"reads": values, "upstream": upstream}, n=16)


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose value differs between two flat mappings (or that only one has)."""
    return [prefix + k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>")]


def downstream(name: str) -> list[str]:
    """Stages that read ``name``'s output, directly or not (they re-run when it changes)."""
    out: list[str] = []
    for other, stage in STAGES.items():
        if other not in out and (name in stage.upstream or any(u in out for u in stage.upstream)):
            out.append(other)
    return out


def stamp_path(work: Path, name: str) -> Path:
    return work / STAMP_DIR / f"{name}.json"


def read_stamp(work: Path, name: str) -> dict | None:
    path = stamp_path(work, name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut short: the stage runs
        return None


@dataclass
class Decision:
    """Whether a stage is cached, and why not."""

    name: str
    status: str
    """``cached``, ``run`` (no stamp), ``rerun`` or ``skipped``."""
    changed: list[str]
    values: dict[str, Any]
    upstream: dict[str, Any]
    stamp: dict | None


def decide(name: str, values: dict, upstream: dict, stamp: dict | None, output_now: Any, forced: bool) -> Decision:
    """Compare a stage's current inputs with its stamp.

    Args:
        values: :func:`stage_values`.
        upstream: upstream stage -> the identity of its output now.
        stamp: the stage's stamp, or None.
        output_now: the identity of the stage's output as it is on disk now (None: missing).
        forced: ``--rerun`` named the stage.
    """
    if stamp is None:
        return Decision(name, "run", ["no_stamp"], values, upstream, stamp)
    changed = changed_keys(stamp.get("reads", {}), values) + changed_keys(stamp.get("upstream", {}), upstream, "upstream.")
    if forced:
        changed.append("forced")
    elif not changed and output_now != stamp.get("output"):
        changed.append("output_missing" if output_now is None else "output_changed")
    return Decision(name, "rerun" if changed else "cached", changed, values, upstream, stamp)


# ----------------------------------------------------------------------------- output identities


def corpus_identity(cfg: ExperimentConfig) -> str | None:
    """Hash of the manifest's card id and shard hashes; None without a manifest."""
    location = storage.join(storage.absolute(cfg.corpus_dir), MANIFEST)
    if not storage.is_file(location):
        return None
    m = json.loads(storage.read_text(location))
    return config_hash({"card_id": m["card"].get("card_id"), "shards": {n: s["sha256"] for n, s in m["shards"].items()}},
                       n=16)


def translator_identity(cfg: ExperimentConfig) -> dict[str, str] | None:
    """Training seed -> sha256 of its checkpoint's weights; None if one is missing."""
    try:
        return {str(s): weights_sha256(translator_dir(cfg, s)) for s in translator_seeds(cfg)}
    except (OSError, ValueError):
        return None


def best_config_identity(cfg: ExperimentConfig) -> str | None:
    """Hash of the settings in the sweep's best config (not its comments); None without one."""
    location = best_config_location(cfg)
    if not storage.is_file(location):
        return None
    return config_hash(yaml.safe_load(storage.read_text(location)) or {}, n=16)


def card_identity(work: Path) -> str | None:
    """The pair card's id, if the card and both models are there."""
    path = work / prepare_pair.CARD_FILE
    if not path.is_file():
        return None
    card = PairCard.load(path)
    return card.card_id if Path(card.tiny.path).is_dir() and Path(card.llm.path).is_dir() else None


# ----------------------------------------------------------------------------- running the stages


class Stages:
    """Runs the demo's stages in order, each unless cached; records what it did."""

    def __init__(self, cfg: ExperimentConfig, work: Path, rerun: list[str], code: dict[str, Any] | None = None) -> None:
        self.cfg, self.work, self.rerun = cfg, work, set(rerun)
        # the run's commit, taken once (``code``: the run's provenance, from its start) and
        # written into every stamp, so a HEAD that moves during the run changes no stamp
        code = code if code is not None else provenance(cfg)
        self.code = {k: v for k, v in code.items() if k in ("git_commit", "git_dirty")}
        self.outputs: dict[str, Any] = {}  # stage -> the identity of its output in this run
        self.report: dict[str, dict] = {}  # stage -> status, changed keys, seconds (results.json "stages")
        self.usage: dict[str, dict] = {}

    def output_now(self, name: str, stamp: dict | None) -> Any:
        """The identity of the stage's output as it is now (results kept in the stamp: the stamp's)."""
        cfg = self.cfg
        if name == "pair":
            return card_identity(self.work)
        if name == "corpus":
            return corpus_identity(cfg)
        if name == "sweep":
            return best_config_identity(cfg)
        if name == "translator":
            return translator_identity(cfg)
        if stamp is None or "result" not in stamp:
            return None
        if name == "service_round" and not Path(stamp["result"]["adapter"]).is_dir():
            return None
        return stamp["output"]

    def check(self, name: str) -> Decision:
        """Decide whether ``name`` runs, and log it."""
        stamp = read_stamp(self.work, name)
        values = stage_values(name, self.cfg)
        upstream = {u: self.outputs.get(u) for u in STAGES[name].upstream}
        d = decide(name, values, upstream, stamp, self.output_now(name, stamp), bool({name, "all"} & self.rerun))
        if d.status == "cached":
            kv(stage="demo", step=name, status="cached", fingerprint=fingerprint(values, upstream))
        else:
            kv(stage="demo", step=name, status=d.status, changed=",".join(d.changed))
        return d

    def run(self, d: Decision, fn: Callable, *args, keep_result: bool = False, **kwargs) -> Any:
        """Run the stage unless ``d`` says cached; returns its result (a cached one from the
        stamp when ``keep_result``, else None) and writes the stamp."""
        name = d.name
        if d.status == "cached":
            self.outputs[name] = d.stamp["output"]
            self.report[name] = {"status": "cached", "fingerprint": d.stamp["fingerprint"],
                                 "computed_seconds": d.stamp.get("seconds"), "computed_with": d.stamp.get("code")}
            if "usage" in d.stamp:  # the run that computed it: a cached rerun keeps its figures
                self.usage[name] = {**d.stamp["usage"], "cached": True}  # which code: stages[name]["computed_with"]
            return d.stamp.get("result")
        kv(stage="demo", step=name, status="start")
        with CpuMeter() as meter:
            result = fn(*args, **kwargs)
        self.usage[name] = meter.result()
        seconds = self.usage[name]["wall_seconds"]
        kv(stage="demo", step=name, status="done", seconds=seconds, cpu_seconds=self.usage[name]["cpu_seconds"],
           core_utilization=self.usage[name]["core_utilization"])
        result_json = json.loads(json.dumps(result, sort_keys=True, default=str)) if keep_result else None
        output = config_hash(result_json, n=16) if keep_result else self.output_now(name, None)
        stamp = {"stage": name, "fingerprint": fingerprint(d.values, d.upstream), "reads": d.values,
                 "upstream": d.upstream, "output": output, "seconds": seconds, "usage": self.usage[name], "code": self.code,
                 **({"result": result_json} if keep_result else {})}
        write_json(stamp_path(self.work, name), stamp)
        self.outputs[name] = output
        self.report[name] = {"status": "ran", "changed": d.changed, "fingerprint": stamp["fingerprint"],
                             "seconds": seconds}
        return result

    def skip(self, name: str, reason: str) -> None:
        kv(stage="demo", step=name, status="skipped", reason=reason)
        self.report[name] = {"status": "skipped", "reason": reason}


def clear_stale_corpus(cfg: ExperimentConfig, d: Decision, card: PairCard) -> None:
    """Remove finished shards that a changed key made wrong, before the corpus build resumes.

    The build resumes from whatever shards exist; they are right only if nothing but the
    corpus' size (:data:`GROWS_ONLY`) changed since they were written (and ``--rerun corpus``
    was not asked for). Without a stamp, the
    manifest's config and card (from an earlier build) stand in for it.

    Raises:
        UserError: if stale shards lie at an explicit ``corpus.storage_path`` (maybe shared:
            gt-ray does not delete there).
    """
    out = storage.absolute(cfg.corpus_dir)
    done = completed_subsets(out) if storage.exists(out) else set()
    if not done:
        return
    if d.stamp is not None:
        old_values, old_card = d.stamp["reads"], d.stamp["upstream"].get("pair")
    elif storage.is_file(storage.join(out, MANIFEST)):
        m = json.loads(storage.read_text(storage.join(out, MANIFEST)))
        old_values = select(flatten(m["config"]), STAGES["corpus"])
        old_card = m["card"].get("card_id")
    else:
        return  # an unfinished first build: resumed as before
    new_values = {k: v for k, v in d.values.items() if d.stamp is not None or k in old_values}
    stale = [k for k in changed_keys(old_values, new_values) if k not in GROWS_ONLY]
    if old_card != card.card_id:
        stale.append("upstream.pair")
    if "forced" in d.changed:  # --rerun corpus: after a code change, every shard is suspect
        stale.append("forced")
    if not stale:
        return
    if cfg.corpus.storage_path is not None:
        raise UserError(f"the corpus at {out} was built with other {', '.join(stale)}: its shards would be reused "
                        "as they are; delete them or point corpus.storage_path elsewhere")
    fs, path = storage.resolve(out)
    for i in sorted(done):
        fs.delete_file(f"{path}/{shard_name(i)}")
    if storage.is_file(storage.join(out, MANIFEST)):
        fs.delete_file(f"{path}/{MANIFEST}")
    kv(stage="demo", step="corpus", cleared_shards=len(done), because=",".join(stale))


def restore_file(location: str | Path, result: dict) -> None:
    """Write a cached stage's result file back if it is missing or holds another run's."""
    if not storage.is_file(location) or json.loads(storage.read_text(location)) != result:
        write_json(location, result)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = base_parser("Run the gt-ray pipeline end to end")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    p.add_argument("--rerun", nargs="+", default=[], choices=[*STAGES, "all"], metavar="STAGE",
                   help=f"run these stages even if cached (after a code change): {', '.join(STAGES)} or all")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    code = provenance(cfg)  # at the start: the commit whose code runs, even if HEAD moves during the run
    t0 = time.time()
    out = work_dir(cfg)
    card_path = out / prepare_pair.CARD_FILE
    stages = Stages(cfg, out, args.rerun, code)

    d = stages.check("pair")
    card = stages.run(d, prepare_pair.load_or_prepare_card, cfg) or PairCard.load(card_path)
    d = stages.check("corpus")
    if d.status != "cached":
        clear_stale_corpus(cfg, d, card)
    stages.run(d, build_corpus.build, cfg, card, args.address)
    if cfg.translator.best_config is not None:
        stages.skip("sweep", "translator.best_config")
        stages.outputs["sweep"] = best_config_identity(cfg)
    else:
        stages.run(stages.check("sweep"), tune_translator.tune, cfg, args.address)
    d = stages.check("translator")  # --rerun translator: after a code change, retrain even where the key matches
    stages.run(d, train_translator.train, cfg, args.address, force="forced" in d.changed)
    d = stages.check("translator_eval")
    held = stages.run(d, eval_translator.evaluate, cfg, keep_result=True)
    if d.status == "cached":
        restore_file(work_location(cfg, eval_translator.EVAL_FILE), held)
    round_d, eval_d = stages.check("service_round"), stages.check("eval")
    if round_d.status == eval_d.status == "cached":  # no service needed
        round_info = stages.run(round_d, service_round.run_round, keep_result=True)
        results = stages.run(eval_d, evaluate.evaluate, keep_result=True)
    else:
        ray = init_ray(args.address)
        tokens = service_round.write_tokens(out / "tokens.json", [f"org-{i}" for i in range(cfg.eval.n_orgs)])
        with service_round.running_service(cfg, translator_dir(cfg), card_path, out / "tokens.json",
                                           ray.get_runtime_context().gcs_address) as url:
            round_info = stages.run(round_d, service_round.run_round, cfg, card_path, url, tokens, cfg.eval.seeds[0],
                                    keep_result=True)
            translate = service_round.http_translator(url, tokens["admin"], card)
            results = stages.run(eval_d, evaluate.evaluate, cfg, translate, keep_result=True)
    results["service_round"] = round_info
    results["stages"] = stages.report  # per stage: ran (and what changed), cached or skipped
    # wall and CPU seconds (driver + Ray workers) and core utilization of every stage: of this
    # run where it ran, of the run that computed it where it was cached ("cached": true)
    results["stage_seconds"] = {name: u["wall_seconds"] for name, u in stages.usage.items()}
    results["stage_usage"] = stages.usage
    results["total_seconds"] = round(time.time() - t0, 1)
    results["provenance"] = code
    (out / evaluate.RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True, default=str))
    write_plots(out, results)
    cached = [n for n, r in stages.report.items() if r["status"] == "cached"]
    kv(stage="demo", status="done", seconds=results["total_seconds"], cached=",".join(cached) or "none",
       results=out / evaluate.RESULTS_FILE)


def write_plots(out: Path, results: dict) -> None:
    """results.png (:func:`jobs.evaluate.write_plot`) and training_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluate.write_plot(out, results)
    hist = load_history(translator_dir_from(out))
    if hist is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], label="train (the objective)")
        ax.plot([h["epoch"] for h in hist], [h["val_loss"] for h in hist], label="validation (chooses the epoch)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("answer NLL (+ weighted MSE) or MSE")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=120)
        plt.close(fig)
