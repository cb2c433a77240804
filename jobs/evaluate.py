"""Evaluate generated LLM updates for simulated organizations against baselines and ceilings.

    gt-ray eval --config configs/tiny.yaml

For each seed, ``eval.n_orgs`` organizations each get private data (own secret k and task
mixture, ``private_train``) and a test split (same task, ``private_test``). Rows:
LLM base, TinyLM fine-tuned (what the org can do alone), LLM fine-tuned (the ceiling; needs
the data), LLM + Grad-Transformer update (the method), LLM + mean shadow update, ridge map,
nearest-neighbour update, and proxy-tuning. Plus rows for all organizations together:
aggregate-then-translate and translate-then-aggregate, evaluated on the union of the test
splits.

The protocol: every learned or retrieved method (translator, mean, ridge, nearest
neighbour) is fit on exactly the translator's training subsets; organizations' data comes
from the private input pools, which no shadow fine-tune saw. PGR is the ratio of
seed-averaged (and organization-averaged) accuracies; the per-seed PGR spread and the
count of organizations where the translator beats nearest neighbour and the TinyLM are
reported beside it. Organizations fall into two groups: those whose combination (tasks of
weight >= ``tasks.MIN_WEIGHT`` with their secrets) some training subset has, and those none
has. Nothing here tunes on the test splits.

Every (seed, organization) is one Ray task with one CPU and one torch thread
(:func:`evaluate_org`); ``--serial`` runs them one after another in this process, with the
same figures.
"""

from __future__ import annotations

import dataclasses
import io
import math
import statistics
import time
from typing import Callable

import torch

from gt_ray import storage, tasks
from gt_ray.aggregate import aggregate
from gt_ray.baselines import MeanUpdate, NearestNeighbour, RidgeMap
from gt_ray.config import ExperimentConfig
from gt_ray.distill import distill
from gt_ray.evaluate import (Scores, SecretProbe, draw_org_specs, pgr, pgr_base, proxy_tuning_logits, score, score_model,
                             score_update, shares_vocabulary, summarize)
from gt_ray.finetune import finetune
from gt_ray.models import LoadedModel, load_card_side
from gt_ray.pipeline import fit_baselines, load_corpus_and_translator, load_translators, subset_split
from gt_ray.stats import LEVEL, paired_bootstrap, per_task_accuracy, task_weight_totals
from jobs.common import (UserError, base_parser, init_ray, kv, load_config, map_tasks, provenance, work_location,
                         write_json)

RESULTS_FILE = "results.json"
ORG_METHODS = ["llm_base", "tiny_ft", "llm_ft", "grad_transformer", "mean_shadow", "ridge", "nearest_neighbour", "proxy_tuning",
               "kd_sequence", "kd_logit"]
LABELS = {"llm_base": "LLM base", "tiny_ft": "TinyLM fine-tuned", "llm_ft": "LLM fine-tuned (ceiling)",
          "grad_transformer": "LLM + Grad-Transformer", "mean_shadow": "LLM + mean shadow update",
          "ridge": "LLM + ridge map", "nearest_neighbour": "LLM + nearest neighbour", "proxy_tuning": "proxy-tuning",
          "kd_sequence": "LLM distilled from TinyLM + update (sequence KD, public prompts)",
          "kd_logit": "LLM distilled from TinyLM + update (logit KD, public prompts)",
          "public_ft": "LLM fine-tuned on public data of the org's distribution",
          "agg_then_translate": "all orgs: aggregate, then translate", "translate_then_agg": "all orgs: translate, then aggregate"}

KD_ROWS = ("kd_sequence", "kd_logit")
ORG_GROUPS = {"all": None, "seen": True, "new": False}
"""Organization groups of the report -> the ``seen`` flag they hold (None: every organization)."""
INTERVAL_BASELINES = ("tiny_ft", "nearest_neighbour", "kd_logit")
"""The translator is compared with each of these (where the run has it) by a paired bootstrap over organizations."""
N_BOOT, BOOTSTRAP_SEED = 10_000, 0
PROXY_SKIPPED = "skipped: the TinyLM and the LLM do not share a vocabulary"
Translate = Callable[[torch.Tensor], torch.Tensor]
"""(B, L_tiny, d_tiny) TinyLM vectors -> (B, L_llm, d_llm) LLM vectors."""


def evaluate(cfg: ExperimentConfig, translate: Translate | None = None, serial: bool = False,
             address: str | None = None) -> dict:
    """Run the evaluation for every seed, scoring each organization with every translator
    training seed (``translator.seeds``; the reported translator row is their mean).
    ``translate`` replaces the first (served) seed's local checkpoint: the demo passes the
    Serve endpoint, so the service is in the loop.

    The organizations of every seed run as Ray tasks, one CPU and one torch thread each
    (:func:`jobs.common.map_tasks`; a local cluster is started unless ``address`` or
    RAY_ADDRESS names one); ``serial`` runs them here one after another instead (the
    reference: every organization is seeded from its own spec, so both give the same
    figures on one torch thread). What a seed shares (baselines, public updates, the probe,
    the multi-organization rows) is computed here. The tasks call ``translate``: a Serve
    endpoint must be reachable from the nodes they run on (the demo's, on 127.0.0.1, from
    its own node only)."""
    if cfg.tasks.data_files:
        raise UserError("gt-ray eval simulates organizations on the generated tasks only, and tasks.data_files is set: "
                        "an organization scores a round's adapter on its own test file with `gt-ray org evaluate`")
    torch.set_num_threads(cfg.eval.num_threads)
    try:
        corpus, _ = load_corpus_and_translator(cfg)
        translators = load_translators(cfg, corpus)
        train_ids, _, _ = subset_split(cfg, corpus)  # the paired training subsets: what baselines may use
    except ValueError as e:
        raise UserError(str(e)) from None
    translates = {s: t.translate for s, t in translators.items()}
    if translate is not None:
        translates[next(iter(translates))] = translate
    card = corpus.card()  # from the manifest: works for a corpus at a URI too
    tiny, llm = load_card_side(card, "tiny", cfg.pair.tiny.dtype), load_card_side(card, "llm", cfg.pair.llm.dtype)
    shadow = corpus.load(train_ids)
    specs = corpus.subset_specs()
    baselines = fit_baselines(shadow, {"mean_shadow": MeanUpdate(), "ridge": RidgeMap(),
                                       "nearest_neighbour": NearestNeighbour(k=1)})
    shared_vocab = shares_vocabulary(tiny.tokenizer, llm.tokenizer)
    ctx = OrgContext(cfg, tiny, llm, translates, baselines, shared_vocab, public_updates_by_combination(shadow, specs),
                     # the premise: does a TinyLM update say what the data is about (the heaviest task's secret)?
                     SecretProbe(tasks.N_PARAMS).fit(shadow["tiny"], shadow["secret_k"]))
    seed_specs = {seed: org_specs(cfg, seed, [specs[i] for i in train_ids]) for seed in cfg.eval.seeds}
    prompts = {seed: kd_prompts(cfg, seed, tiny.tokenizer) for seed in cfg.eval.seeds}
    items = [(seed, spec, *prompts[seed]) for seed in cfg.eval.seeds for spec in seed_specs[seed]]
    where = [(seed, j) for seed in cfg.eval.seeds for j in range(len(seed_specs[seed]))]
    if not serial:
        init_ray(address)
    t0 = time.time()
    finished = 0

    def progress(i: int, r: dict) -> None:
        nonlocal finished
        finished += 1
        seed, j = where[i]
        kv(stage="eval", seed=seed, org=f"{j + 1}/{len(seed_specs[seed])}", done=f"{finished}/{len(items)}",
           tiny_ft=r["scores"]["tiny_ft"].accuracy, llm_ft=r["scores"]["llm_ft"].accuracy,
           grad_transformer=r["scores"]["grad_transformer"].accuracy, seconds=round(time.time() - t0, 1))

    results = map_tasks(evaluate_org, ctx, items, on_result=progress, serial=serial)
    per_seed = {seed: seed_rows(ctx, [r for r, (s, _) in zip(results, where) if s == seed]) for seed in cfg.eval.seeds}
    out = combine(per_seed, cfg, shared_vocab)
    out["seconds"] = round(time.time() - t0, 1)
    out["provenance"] = provenance(cfg)
    write_json(work_location(cfg, RESULTS_FILE), out)
    write_plot(work_location(cfg), out)
    print(format_results(out))
    return out


def org_specs(cfg: ExperimentConfig, seed: int, train_specs: list) -> list:
    """The seed's organizations: the first ``seen_fraction`` hold the combination (mixture and
    secrets) of a training shadow subset, on private data; the rest draw a fresh one."""
    import random

    specs = draw_org_specs(cfg.tasks.names, cfg.eval.n_orgs, seed, cfg.finetune.n_examples, cfg.tasks.dirichlet_alpha,
                           cfg.tasks.secret_per_task)
    rng = random.Random(f"seen-orgs|{seed}")
    n_seen = round(cfg.eval.n_orgs * cfg.eval.seen_fraction)
    for i in range(n_seen):
        like = rng.choice(train_specs)
        specs[i] = dataclasses.replace(like, split=specs[i].split, n=specs[i].n, seed=specs[i].seed)
    return specs


def public_updates_by_combination(shadow: dict, specs) -> dict:
    """combination -> the LLM update fine-tuned on public data of that combination (the
    final snapshot of the first training subset that has it): what a provider already
    holds for an organization whose private data shares a shadow subset's distribution."""
    last = int(shadow["step"].max())
    out: dict = {}
    for row in torch.nonzero(shadow["step"] == last).flatten().tolist():
        out.setdefault(specs[int(shadow["subset_id"][row])].combination(), shadow["llm"][row])
    return out


def kd_prompts(cfg: ExperimentConfig, seed: int, tokenizer) -> tuple[list[str], int]:
    """The provider's prompts for distillation: ``finetune.n_examples`` public-split prompts,
    uniform over the tasks (the public data's own answers are not used), and an answer
    length limit: the longest public answer in ``tokenizer``'s tokens plus two."""
    import random

    names = list(cfg.tasks.names)
    spec = tasks.DatasetSpec(split="public", secret_k=0, mixture={t: 1 / len(names) for t in names},
                             n=cfg.finetune.n_examples, seed=random.Random(f"kd|{seed}").randrange(2**31))
    examples = tasks.generate_dataset(spec)
    longest = max(len(tokenizer(ex.answer, add_special_tokens=False).input_ids) for ex in examples)
    return [ex.prompt for ex in examples], longest + 2


def org_methods(cfg: ExperimentConfig, shared_vocab: bool) -> list[str]:
    """The per-organization rows this run computes: proxy-tuning and logit KD need one vocabulary."""
    kd = {f"kd_{m}" for m in cfg.eval.kd if shared_vocab or m != "logit"}
    return [m for m in ORG_METHODS if (shared_vocab or m != "proxy_tuning") and (not m.startswith("kd_") or m in kd)]


@dataclasses.dataclass
class OrgContext:
    """What every organization's evaluation reads: built once here, put in Ray's object
    store once (:func:`jobs.common.map_tasks`)."""

    cfg: ExperimentConfig
    tiny: LoadedModel
    llm: LoadedModel
    translates: dict[int, Translate]
    """translator training seed -> translate function; the first is the served seed."""
    baselines: dict
    """``mean_shadow``, ``ridge``, ``nearest_neighbour``, fitted on the training subsets."""
    shared_vocab: bool
    public_updates: dict
    """combination -> the LLM update fine-tuned on public data (:func:`public_updates_by_combination`)."""
    probe: SecretProbe


def evaluate_org(ctx: OrgContext, seed: int, spec, prompts: list[str], max_new: int) -> dict:
    """One organization: its fine-tunes, every row's score on its test split, its record.

    Everything is seeded from ``spec`` (its data and fine-tune seeds) and ``seed`` (the KD
    prompts), and every fine-tune resets the LoRA to the card's init, so the result does not
    depend on which organization ran before on the same models.

    Returns:
        ``scores`` (method -> Scores), ``cost`` (method -> provider seconds: one per
        translator seed for ``grad_transformer``), ``tiny_vec`` (L_tiny, d_tiny), ``test``
        (the test examples) and ``record`` (what results.json keeps of the organization).
    """
    cfg, tiny, llm = ctx.cfg, ctx.tiny, ctx.llm
    methods = org_methods(cfg, ctx.shared_vocab)
    scores: dict[str, Scores] = {}
    cost: dict[str, list[float]] = {m: [] for m in methods if m == "grad_transformer" or m.startswith("kd_")}
    train = tasks.generate_dataset(spec)
    test = tasks.generate_dataset(spec, split="private_test", n=cfg.eval.n_test)
    tiny_vec = finetune(tiny, train, cfg.finetune, seed=spec.seed).final.update
    scores["tiny_ft"] = score_model(tiny.model, tiny.tokenizer, test)
    if ctx.shared_vocab:  # the TinyLM holds its fine-tuned LoRA now
        llm.reset()
        scores["proxy_tuning"] = score(proxy_tuning_logits(llm.model, tiny.model), tiny.tokenizer, test)
    scores["llm_base"] = score_update(llm, torch.zeros(llm.layout.shape), test)
    finetune(llm, train, cfg.finetune, seed=spec.seed)
    scores["llm_ft"] = score_model(llm.model, llm.tokenizer, test)
    by_seed = {}
    for t_seed, fn in ctx.translates.items():
        start = time.perf_counter()
        generated = fn(tiny_vec.unsqueeze(0))[0]
        cost["grad_transformer"].append(time.perf_counter() - start)
        by_seed[t_seed] = score_update(llm, generated, test)
    scores["grad_transformer"] = mean_scores(list(by_seed.values()))
    for name, b in ctx.baselines.items():
        scores[name] = score_update(llm, b.predict(tiny_vec.unsqueeze(0))[0], test)
    for mode in (m[3:] for m in methods if m.startswith("kd_")):
        start = time.perf_counter()
        distill(llm, tiny, tiny_vec, prompts, cfg.finetune, spec.seed, mode, max_new)
        cost[f"kd_{mode}"].append(time.perf_counter() - start)
        scores[f"kd_{mode}"] = score_model(llm.model, llm.tokenizer, test)
    seen = spec.combination() in ctx.public_updates
    accuracy = {m: scores[m].accuracy for m in methods}
    if seen:  # the paper's setting: the provider holds public data of this very distribution
        accuracy["public_ft"] = score_update(llm, ctx.public_updates[spec.combination()], test).accuracy
    record = {"secret_k": spec.secret_k, "secrets": spec.secrets, "mixture": spec.mixture, "seen": seen,
              "probe_correct": int(ctx.probe.predict(tiny_vec[None])[0]) == spec.secret_k, "accuracy": accuracy}
    if len(by_seed) > 1:
        record["accuracy_by_translator_seed"] = {"grad_transformer": {str(s): v.accuracy for s, v in by_seed.items()}}
    return {"scores": scores, "cost": cost, "tiny_vec": tiny_vec, "test": test, "record": record}


def seed_rows(ctx: OrgContext, orgs: list[dict]) -> dict:
    """One evaluation seed's figures from its organizations' :func:`evaluate_org` results,
    in organization order, plus the rows of all organizations together (the served
    translator on the union of the test splits)."""
    translate, llm = next(iter(ctx.translates.values())), ctx.llm
    per_org = {m: [o["scores"][m] for o in orgs] for m in org_methods(ctx.cfg, ctx.shared_vocab)}
    cost = {m: [c for o in orgs for c in o["cost"][m]] for m in orgs[0]["cost"]}
    tiny_vecs = [o["tiny_vec"] for o in orgs]
    union = [ex for o in orgs for ex in o["test"]]
    agg_tiny = aggregate(tiny_vecs, "mean")
    multi = {"agg_then_translate": score_update(llm, translate(agg_tiny.unsqueeze(0))[0], union),
             "translate_then_agg": score_update(llm, aggregate([translate(v.unsqueeze(0))[0] for v in tiny_vecs], "mean"), union),
             "llm_base": score_update(llm, torch.zeros(llm.layout.shape), union)}
    return {"summary": summarize(per_org), "orgs": [o["record"] for o in orgs], "multi": {k: v.to_dict() for k, v in multi.items()},
            "provider_seconds": {m: statistics.fmean(v) for m, v in cost.items()}}


def mean_scores(scores: list[Scores]) -> Scores:
    """The mean of several scorings of one organization's test set (one per translator seed)."""
    return Scores(statistics.fmean(s.accuracy for s in scores), statistics.fmean(s.nll for s in scores), scores[0].n)


def seed_spread(vals: list[float]) -> float:
    """The standard deviation over seeds: 0.0 for one seed, NaN where a value is NaN (the
    PGR of a seed whose TinyLM and LLM ceiling tie; ``statistics.stdev`` raises on NaN)."""
    if any(math.isnan(v) for v in vals):
        return float("nan")
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def combine(per_seed: dict, cfg: ExperimentConfig, shared_vocab: bool) -> dict:
    """Seed-averaged table. PGR is the ratio of seed-averaged accuracies (not the mean of
    per-seed ratios, which a small per-seed gap blows up); the per-seed spread is beside it."""
    methods = list(next(iter(per_seed.values()))["summary"])
    table = {}
    for m in methods:
        table[m] = {}
        for k in ("accuracy", "nll", "pgr_accuracy", "pgr_base_accuracy"):
            vals = [per_seed[s]["summary"][m][k] for s in per_seed]
            key = k if k in ("accuracy", "nll") else "per_seed_" + k
            table[m][key] = statistics.fmean(vals)
            table[m][key + "_std"] = seed_spread(vals)
    for m in methods:
        for metric in ("accuracy", "nll"):
            table[m][f"pgr_{metric}"] = pgr(table[m][metric], table["tiny_ft"][metric], table["llm_ft"][metric])
            table[m][f"pgr_base_{metric}"] = pgr_base(table[m][metric], table["llm_base"][metric], table["llm_ft"][metric])
    multi = {}
    for k in next(iter(per_seed.values()))["multi"]:
        multi[k] = {"accuracy": statistics.fmean(per_seed[s]["multi"][k]["accuracy"] for s in per_seed),
                    "nll": statistics.fmean(per_seed[s]["multi"][k]["nll"] for s in per_seed)}
    orgs = [o for s in per_seed for o in per_seed[s]["orgs"]]
    gt, best_base = table["grad_transformer"], max(("mean_shadow", "ridge", "nearest_neighbour"), key=lambda m: table[m]["accuracy"])
    verdict = {m: gt["accuracy"] > table[m]["accuracy"] for m in ("mean_shadow", "ridge", "nearest_neighbour", *KD_ROWS)
               if m in table}
    cost = {m: statistics.fmean(per_seed[s]["provider_seconds"][m] for s in per_seed)
            for m in next(iter(per_seed.values()))["provider_seconds"]}
    return {"methods": table, "groups": group_table(orgs, methods), "counts": org_counts(orgs), "secret_probe": probe_table(orgs),
            "multi_org": multi, "provider_seconds_per_org": cost, "per_seed": per_seed, "seeds": list(per_seed),
            "n_orgs": cfg.eval.n_orgs,
            "n_test": cfg.eval.n_test, "beats": verdict, "best_baseline": best_base,
            "proxy_tuning": "computed" if shared_vocab else PROXY_SKIPPED, "org_report": org_report(orgs, methods)}


def org_report(orgs: list[dict], methods: list[str], n_boot: int = N_BOOT, seed: int = BOOTSTRAP_SEED) -> dict:
    """Every organization (over all seeds), and the seen and new groups: accuracy per method,
    its least-squares split by task, and paired-bootstrap 95% intervals of the translator
    minus each of :data:`INTERVAL_BASELINES`, resampling organizations.

    An organization record may hold several translator seeds as
    ``accuracy_by_translator_seed: {method: {seed: accuracy}}`` with ``accuracy[method]``
    their mean: intervals then use that per-organization mean, and the group reports the
    spread of the method's group mean over translator seeds.

    Args:
        orgs: organization records (``accuracy``, ``seen``, optionally ``mixture`` and
            ``accuracy_by_translator_seed``).
        methods: the methods to report, in table order (``public_ft`` is added where every
            member of a group has it).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{"bootstrap": {...}, "groups": {"all" | "seen" | "new": group}}``; a group holds
        ``n_orgs`` and, when not empty, ``accuracy``, ``intervals``, ``per_task`` and
        ``translator_seed_spread`` (see :func:`org_group`).

    Raises:
        ValueError: if a record's translator-seed accuracies disagree with its accuracy, or
            organizations of a group hold different translator seeds.
    """
    return {"bootstrap": {"n_boot": n_boot, "seed": seed, "level": LEVEL, "unit": "organization"},
            "groups": {g: org_group([o for o in orgs if flag is None or o["seen"] == flag], methods, n_boot, seed)
                       for g, flag in ORG_GROUPS.items()}}


def org_group(members: list[dict], methods: list[str], n_boot: int, seed: int) -> dict:
    """One group of :func:`org_report`: ``accuracy`` (method -> org-averaged accuracy),
    ``intervals`` (``grad_transformer_minus_<baseline>`` -> :func:`gt_ray.stats.paired_bootstrap`),
    ``per_task`` (``weight``: task -> total weight; ``accuracy``: method -> task -> estimate;
    or ``skipped``: why not) and ``translator_seed_spread`` (method -> ``n_seeds``, ``min``,
    ``max``, ``by_seed``) when records hold several translator seeds."""
    entry: dict = {"n_orgs": len(members)}
    if not members:
        return entry
    rows = [m for m in (*methods, "public_ft") if all(m in o["accuracy"] for o in members)]
    entry["accuracy"] = {m: statistics.fmean(o["accuracy"][m] for o in members) for m in rows}
    column = lambda m: [o["accuracy"][m] for o in members]  # noqa: E731
    if "grad_transformer" in rows:
        entry["intervals"] = {f"grad_transformer_minus_{b}": paired_bootstrap(column("grad_transformer"), column(b), n_boot, seed)
                              for b in INTERVAL_BASELINES if b in rows}
    if all("mixture" in o for o in members):
        mixtures = [o["mixture"] for o in members]
        try:
            entry["per_task"] = {"weight": task_weight_totals(mixtures),
                                 "accuracy": {m: per_task_accuracy(mixtures, column(m)) for m in rows}}
        except ValueError as e:  # too few organizations (or mixtures) to determine every task
            entry["per_task"] = {"skipped": str(e)}
    else:
        entry["per_task"] = {"skipped": "the organization records hold no mixture"}
    spread = translator_seed_spread(members)
    if spread:
        entry["translator_seed_spread"] = spread
    return entry


def translator_seed_spread(members: list[dict]) -> dict:
    """method -> the group mean per translator seed, and its min and max, for the methods
    whose records hold ``accuracy_by_translator_seed``; {} when none does.

    Raises:
        ValueError: if a record's ``accuracy[method]`` is not the mean of its seeds, or the
            members do not all hold the same translator seeds.
    """
    by = [o.get("accuracy_by_translator_seed", {}) for o in members]
    out = {}
    for m in dict.fromkeys(k for b in by for k in b):
        seeds = {str(s) for s in next(b for b in by if m in b)[m]}
        for o, b in zip(members, by):
            if m not in b or {str(s) for s in b[m]} != seeds:
                raise ValueError(f"{m}: every organization must hold the translator seeds {sorted(seeds)}")
            if abs(statistics.fmean(b[m].values()) - o["accuracy"][m]) > 1e-9:
                raise ValueError(f"{m}: accuracy must be the mean of accuracy_by_translator_seed")
        means = {s: statistics.fmean(v for b in by for k, v in b[m].items() if str(k) == s) for s in sorted(seeds)}
        out[m] = {"n_seeds": len(seeds), "min": min(means.values()), "max": max(means.values()), "by_seed": means}
    return out


def group_table(orgs: list[dict], methods: list[str]) -> dict:
    """Accuracy per method over the organizations whose combination a training subset has
    ("seen": the paper's setting, private data of a shadow subset's distribution, where
    ``public_ft`` is scored too) and those none has ("unseen"), with PGR of the group's averages."""
    out = {}
    for group, flag in (("seen", True), ("unseen", False)):
        members = [o for o in orgs if o["seen"] == flag]
        entry: dict = {"n_orgs": len(members)}
        if members:
            rows = [m for m in (*methods, "public_ft") if all(m in o["accuracy"] for o in members)]
            acc = {m: statistics.fmean(o["accuracy"][m] for o in members) for m in rows}
            entry["accuracy"] = acc
            entry["pgr_accuracy"] = {m: pgr(acc[m], acc["tiny_ft"], acc["llm_ft"]) for m in rows}
            entry["pgr_base_accuracy"] = {m: pgr_base(acc[m], acc["llm_base"], acc["llm_ft"]) for m in rows}
        out[group] = entry
    return out


def probe_table(orgs: list[dict], weak: float = 0.5) -> dict:
    """Accuracy of the secret probe (fit on the training subsets' TinyLM vectors) on the
    organizations' TinyLM vectors: all of them, and those whose TinyLM ft scores below ``weak``."""
    scored = [o for o in orgs if o.get("probe_correct") is not None]
    low = [o for o in scored if o["accuracy"]["tiny_ft"] < weak]
    mean = lambda xs: statistics.fmean(o["probe_correct"] for o in xs) if xs else float("nan")  # noqa: E731
    return {"chance": 1 / tasks.N_PARAMS, "accuracy": mean(scored), "n": len(scored), f"accuracy_tiny_ft_below_{weak}": mean(low),
            f"n_tiny_ft_below_{weak}": len(low)}


def org_counts(orgs: list[dict], margin: float = 0.2) -> dict:
    """How many organizations (over all seeds) the translator wins or loses on."""
    gt = [o["accuracy"]["grad_transformer"] for o in orgs]
    return {"n": len(orgs),
            "beats_nearest_neighbour": sum(g > o["accuracy"]["nearest_neighbour"] for g, o in zip(gt, orgs)),
            "ties_nearest_neighbour": sum(g == o["accuracy"]["nearest_neighbour"] for g, o in zip(gt, orgs)),
            "beats_tiny_ft": sum(g > o["accuracy"]["tiny_ft"] for g, o in zip(gt, orgs)),
            f"below_tiny_ft_by_more_than_{margin}": sum(g < o["accuracy"]["tiny_ft"] - margin for g, o in zip(gt, orgs)),
            "llm_ft_failed_below_0.5": sum(o["accuracy"]["llm_ft"] < 0.5 for o in orgs)}


def format_results(out: dict) -> str:
    n = len(out["seeds"])
    lines = [f"{out['n_orgs']} organizations x {n} seed(s), {out['n_test']} test examples each; mean +- std over seeds; "
             "PGR of seed-averaged accuracies (per-seed spread in brackets)",
             "| update | accuracy | answer NLL | PGR (acc) | PGR_base (acc) |", "|---|---|---|---|---|"]
    for m, r in out["methods"].items():
        lines.append(f"| {LABELS[m]} | {r['accuracy']:.3f} +- {r['accuracy_std']:.3f} | {r['nll']:.3f} | "
                     f"{r['pgr_accuracy']:.2f} (+- {r['per_seed_pgr_accuracy_std']:.2f}) | {r['pgr_base_accuracy']:.2f} |")
    if "proxy_tuning" not in out["methods"]:
        lines.append(f"| {LABELS['proxy_tuning']} | {out['proxy_tuning']} | | | |")
    for m, r in out["multi_org"].items():
        lines.append(f"| {LABELS.get(m, m)} (union of test splits) | {r['accuracy']:.3f} | {r['nll']:.3f} | | |")
    beats = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in out["beats"].items())
    lines.append(f"Grad-Transformer beats -> {beats}. Proxy-tuning: {out['proxy_tuning']}.")
    for group, g in out["groups"].items():
        if g["n_orgs"]:
            acc = g["accuracy"]
            lines.append(f"{group} combinations ({g['n_orgs']} orgs): " + ", ".join(
                f"{m} {acc[m]:.3f}" for m in ("tiny_ft", "llm_ft", "grad_transformer", "nearest_neighbour", "ridge", "mean_shadow"))
                + f"; PGR {g['pgr_accuracy']['grad_transformer']:.2f}")
        else:
            lines.append(f"{group} combinations: no organization")
    seen = out["groups"]["seen"]
    if seen["n_orgs"]:
        lines += ["", f"The paper's setting: the {seen['n_orgs']} organizations whose private data shares a training shadow "
                  "subset's distribution (mixture and secrets)", "| update | accuracy | PGR (acc) | PGR_base (acc) |", "|---|---|---|---|"]
        for m, a in seen["accuracy"].items():
            lines.append(f"| {LABELS[m]} | {a:.3f} | {seen['pgr_accuracy'][m]:.2f} | {seen['pgr_base_accuracy'][m]:.2f} |")
        lines.append("")
    cost = out.get("provider_seconds_per_org", {})
    if cost:
        lines.append("Provider-side seconds per organization: " + ", ".join(f"{m} {v:.2f}" for m, v in cost.items()))
    c = out["counts"]
    lines.append(f"Of {c['n']} organizations, the translator beats nearest neighbour on {c['beats_nearest_neighbour']} "
                 f"(ties {c['ties_nearest_neighbour']}) and the TinyLM on {c['beats_tiny_ft']}; it is more than 0.2 below "
                 f"the TinyLM on {c['below_tiny_ft_by_more_than_0.2']}; LLM fine-tunes below 0.5: {c['llm_ft_failed_below_0.5']}.")
    p = out.get("secret_probe")
    if p and p["n"]:
        lines.append(f"Secret probe on the organizations' TinyLM updates: {p['accuracy']:.2f} (chance {p['chance']:.2f}); "
                     f"on the {p['n_tiny_ft_below_0.5']} whose TinyLM ft scores below 0.5: {p['accuracy_tiny_ft_below_0.5']:.2f}")
    if "org_report" in out:
        lines += ["", format_org_report(out["org_report"])]
    lines.append("")
    lines.append("Per-organization accuracy (first seed): " + "; ".join(
        f"org{j} {'seen' if o['seen'] else 'new'}: tiny {o['accuracy']['tiny_ft']:.2f} / gen {o['accuracy']['grad_transformer']:.2f} / "
        f"nn {o['accuracy']['nearest_neighbour']:.2f} / llm {o['accuracy']['llm_ft']:.2f}"
        for j, o in enumerate(out["per_seed"][out["seeds"][0]]["orgs"])))
    return "\n".join(lines)


def format_org_report(report: dict) -> str:
    """Markdown tables of :func:`org_report`: accuracy for all / seen / new organizations,
    translator-minus-baseline intervals, and the per-task split of each group."""
    groups = {g: e for g, e in report["groups"].items() if e["n_orgs"]}
    names = list(groups)
    b = report["bootstrap"]
    counts = " / ".join(str(e["n_orgs"]) for e in report["groups"].values())
    lines = [f"Organizations, {' / '.join(report['groups'])} ({counts}): "
             "org-averaged accuracy; [min, max] of the mean over translator seeds where there are several",
             "| update | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    methods = list(dict.fromkeys(m for e in groups.values() for m in e["accuracy"]))
    for m in methods:
        cells = []
        for e in groups.values():
            cell = f"{e['accuracy'][m]:.3f}" if m in e["accuracy"] else ""
            spread = e.get("translator_seed_spread", {}).get(m)
            cells.append(cell + (f" [{spread['min']:.3f}, {spread['max']:.3f}]" if spread else ""))
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    pairs = list(dict.fromkeys(k for e in groups.values() for k in e.get("intervals", {})))
    if pairs:
        lines += ["", f"Translator minus baseline: mean over organizations [paired-bootstrap {b['level']:.0%} interval, "
                  f"{b['n_boot']} resamples of organizations, seed {b['seed']}]",
                  "| translator minus | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in pairs:
            cells = [f"{i['mean_diff']:+.3f} [{i['lo']:+.3f}, {i['hi']:+.3f}]" if (i := e.get("intervals", {}).get(k)) else ""
                     for e in groups.values()]
            lines.append(f"| {LABELS.get(k.removeprefix('grad_transformer_minus_'))} | " + " | ".join(cells) + " |")
    for g, e in groups.items():
        split = e.get("per_task", {})
        if "skipped" in split:
            lines += ["", f"Per-task accuracy, {g} organizations: skipped ({split['skipped']})"]
            continue
        if not split:
            continue
        task_names = list(split["weight"])
        lines += ["", f"Per-task accuracy, {g} organizations ({e['n_orgs']}): least-squares split of organization accuracy "
                  "by task weight, an estimate (about +-0.15 with 24 organizations, wider with fewer; a task of little total "
                  "weight is poorly determined)",
                  "| update | " + " | ".join(task_names) + " |", "|---|" + "---|" * len(task_names),
                  "| total task weight | " + " | ".join(f"{split['weight'][t]:.2f}" for t in task_names) + " |"]
        for m, per_task in split["accuracy"].items():
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(f"{per_task[t]:.2f}" for t in task_names) + " |")
    return "\n".join(lines)


def write_plot(out_dir, results: dict) -> None:
    """results.png: accuracy per method over all organizations (with the spread over seeds),
    and over the seen and new groups. ``out_dir`` is a path or a URI (gt_ray.storage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    names = [m for m in ORG_METHODS if m in methods] + (["public_ft"] if "public_ft" in results["groups"]["seen"].get("accuracy", {}) else [])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.27
    for k, (label, acc) in enumerate((("all", {m: r["accuracy"] for m, r in methods.items()}),
                                      *((g, results["groups"][key].get("accuracy", {}))
                                        for g, key in (("seen (the paper's setting)", "seen"), ("new", "unseen"))))):
        xs = [i + (k - 1) * width for i, m in enumerate(names) if m in acc]
        err = [methods[m]["accuracy_std"] for m in names if m in acc] if label == "all" else None
        ax.bar(xs, [acc[m] for m in names if m in acc], width, yerr=err, capsize=2, label=label)
    ax.set_xticks(range(len(names)), [LABELS[m] for m in names], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (org-averaged)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"{results['n_orgs']} organizations x {len(results['seeds'])} seeds")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(storage.join(out_dir, "results.png"), png.getvalue())


def main(argv=None) -> None:
    p = base_parser("Evaluate generated updates for simulated organizations")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--serial", action="store_true",
                   help="evaluate the organizations one after another in this process, without Ray (the reference path)")
    args = p.parse_args(argv)
    evaluate(load_config(args.config), serial=args.serial, address=args.address)
