"""Collaboration: organizations that share one task but hold few examples each join one round.

    gt-ray collab --config configs/tiny.yaml

For each seed, ``collab.groups`` groups are drawn; a group is one task drawn like an
organization's (a Dirichlet task mixture and its secrets) and ``max(collab.sizes)`` members,
each with its own ``collab.n_examples`` examples from ``private_train`` (own seed). Every
member fine-tunes the card's TinyLM with the card's recipe (``finetune``). The group's test
split is ``collab.n_test`` examples of the same task from ``private_test``.

Rows for a round of the group's first ``n`` members (``n`` in ``collab.sizes``, nested):

- ``member_tiny``, ``member_translated``: each member alone, its TinyLM fine-tune and the
  LLM with its own translated update (the mean over the ``n`` members, and the best one);
- ``agg_then_translate``: the service's default round (``rule='mean'``), TinyLM vectors
  averaged then translated once (:func:`gt_ray.rounds.compute_round_update`);
- ``translate_then_mean``: each vector translated, the LLM vectors averaged;
- ``weight_space``: each vector translated, then the exact mean of the LoRA products, the
  rank ``n r`` PEFT adapter the service exports with ``weight_space`` (loaded with
  ``PeftModel.from_pretrained`` and scored);
- ``tiny_union``, ``llm_union``: the TinyLM and the LLM fine-tuned on the union of the
  ``n`` members' data (what pooling the data would give; the LLM one needs the data).

Robust aggregation, at ``n = max(collab.sizes)``: the last member attacks, sending its honest
update scaled by ``collab.attack_scale`` (``scale``) or with its sign flipped (``sign_flip``);
the round aggregates with ``mean``, ``median`` or ``trimmed_mean`` (aggregate then translate,
as the service does) and is scored beside the clean round with the same rule. Whether the
service's input-norm bound (the norm file in the translator checkpoint) would have refused
the attacker's vector in a ``mean`` round is recorded beside it.

The targets of the issue are checked and printed: the aggregate improves with ``n``; at the
largest ``n`` it beats every single member (the best of each member's TinyLM and its own
translation); under attack, median and trimmed mean stay within 0.05 of their clean round
and the plain mean does not. Spreads are over the ``seeds x groups`` groups (the task drawn
moves accuracy far more than the seed of a fine-tune).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from gt_ray import tasks
from gt_ray.config import ExperimentConfig
from gt_ray.yaml_io import config_hash
from gt_ray.evaluate import Scores, score_model, score_update
from gt_ray.finetune import finetune
from gt_ray.models import LoadedModel, load_card_side, load_model
from gt_ray.rounds import RoundSpec, compute_round_update, write_stacked_adapter
from gt_ray.pipeline import load_corpus_and_translator, subset_split, translator_dir
from gt_ray.translator.checkpoint import NORM_BOUND_FILE, load_norm_bound, weights_sha256
from gt_ray.wire import NormBound, check_update_content
from jobs.common import UserError, base_parser, kv, load_config, work_dir, write_json

RESULTS_FILE = "collaboration.json"
PLOT_FILE = "collaboration.png"
ROUND_ROWS = ["member_tiny_mean", "member_tiny_best", "member_translated_mean", "member_translated_best", "best_member",
              "agg_then_translate", "translate_then_mean", "weight_space", "tiny_union", "llm_union"]
LABELS = {"member_tiny_mean": "each member alone: TinyLM ft (mean)", "member_tiny_best": "each member alone: TinyLM ft (best)",
          "member_translated_mean": "each member alone: own translation (mean)",
          "member_translated_best": "each member alone: own translation (best)",
          "best_member": "best single member (TinyLM or translation)",
          "agg_then_translate": "aggregate (TinyLM mean), then translate", "translate_then_mean": "translate each, mean of LLM vectors",
          "weight_space": "translate each, exact weight-space aggregate (exported adapter)",
          "tiny_union": "TinyLM ft on the union", "llm_union": "LLM ft on the union (needs the data)"}
RULES = ("mean", "median", "trimmed_mean")
ATTACKS = ("scale", "sign_flip")
ROBUST_TOLERANCE = 0.05
Translate = Callable[[torch.Tensor], torch.Tensor]
"""(B, L_tiny, d_tiny) TinyLM vectors -> (B, L_llm, d_llm) LLM vectors."""


def run(cfg: ExperimentConfig) -> dict:
    """Load the pair and the translator, run every group, write the JSON and the plot."""
    torch.set_num_threads(cfg.finetune.num_threads)
    try:
        corpus, translator = load_corpus_and_translator(cfg)
        train_ids, val_ids, _ = subset_split(cfg, corpus)
    except ValueError as e:
        raise UserError(str(e)) from None
    card = corpus.card()
    tiny, llm = load_card_side(card, "tiny"), load_card_side(card, "llm")
    bound, source = load_norm_bound(translator_dir(cfg), fingerprint=card.tiny.layout_fingerprint), NORM_BOUND_FILE
    if bound is None:  # a checkpoint from before the bound: the same bound, from the subsets it was trained on
        norms = corpus.load(train_ids + val_ids)["tiny"].double().flatten(1).norm(dim=1)  # (N,)
        bound, source = NormBound(float(norms.min()), float(norms.max())), "computed from the translator's train+val subsets"
    out = collaborate(cfg, tiny, llm, translator.translate, bound, group_cache(cfg, card.card_id, bound))
    out["norm_bound"] = {"low": bound.low, "high": bound.high, "source": source}
    out["loadavg"] = os.getloadavg()
    out["threads"] = torch.get_num_threads()
    path = write_json(work_dir(cfg) / RESULTS_FILE, out)
    write_plot(work_dir(cfg) / PLOT_FILE, out)
    print(format_results(out))
    kv(stage="collab", status="done", seconds=out["seconds"], results=path, plot=work_dir(cfg) / PLOT_FILE)
    return out


def group_cache(cfg: ExperimentConfig, card_id: str, bound: NormBound) -> Path:
    """``{work_dir}/collab_groups/{key}``: the key hashes every setting a group's result
    depends on (not ``groups`` or ``seeds``, which only say which groups run), the card and
    the translator's weights."""
    c = cfg.collab
    weights = weights_sha256(translator_dir(cfg))
    key = config_hash({"collab": {k: v for k, v in dataclasses.asdict(c).items() if k not in ("groups", "seeds")},
                       "finetune": dataclasses.asdict(cfg.finetune), "tasks": dataclasses.asdict(cfg.tasks),
                       "card": card_id, "translator": weights, "norm_bound": [bound.low, bound.high]})
    return work_dir(cfg) / "collab_groups" / key


def collaborate(cfg: ExperimentConfig, tiny: LoadedModel, llm: LoadedModel, translate: Translate,
                norm_bound: NormBound | None = None, cache: Path | None = None) -> dict:
    """Every seed's groups: the round rows per size and the robust rows; summary and targets.

    Groups run group-major (group 0 of every seed first). With ``cache`` (a directory whose
    name keys everything a group's result depends on, see :func:`group_cache`), each group's
    result is written there as it is done and reused by a later run, so an interrupted run
    resumes and a run with fewer groups or seeds costs nothing.
    """
    c = cfg.collab
    t0 = time.time()
    groups = []
    for g in range(c.groups):
        for seed in c.seeds:
            path = cache / f"seed{seed}-group{g}.json" if cache is not None else None
            reused = path is not None and path.is_file()
            if reused:
                groups.append(json.loads(path.read_text()))
            else:
                groups.append(run_group(cfg, seed, g, tiny, llm, translate, norm_bound))
                if path is not None:
                    write_json(path, groups[-1])
            kv(stage="collab", seed=seed, group=g, reused=reused,
               **{f"agg_n{n}": groups[-1]["rounds"][str(n)]["agg_then_translate"]["accuracy"] for n in c.sizes},
               seconds=round(time.time() - t0, 1))
    out = summarize(groups, c.sizes)
    out.update(groups=groups, seeds=list(c.seeds), sizes=list(c.sizes), n_examples=c.n_examples, n_test=c.n_test,
               attack_scale=c.attack_scale, trim_fraction=c.trim_fraction, finetune=dataclasses.asdict(cfg.finetune),
               seconds=round(time.time() - t0, 1))
    return out


def draw_group(cfg: ExperimentConfig, seed: int, g: int) -> tuple[tasks.DatasetSpec, list[tasks.DatasetSpec]]:
    """One task (mixture and secrets, drawn like an organization's) and its members' specs."""
    c = cfg.collab
    rng = random.Random(f"collab|{seed}|{g}")
    task = tasks.draw_dataset_spec(rng, "private_train", cfg.tasks.names, c.n_examples, cfg.tasks.dirichlet_alpha,
                                   cfg.tasks.secret_per_task)
    return task, [dataclasses.replace(task, seed=rng.randrange(2**31)) for _ in range(max(c.sizes))]


def run_group(cfg: ExperimentConfig, seed: int, g: int, tiny: LoadedModel, llm: LoadedModel, translate: Translate,
              norm_bound: NormBound | None) -> dict:
    c = cfg.collab
    task, members = draw_group(cfg, seed, g)
    test = tasks.generate_dataset(task, split="private_test", n=c.n_test)
    trains = [tasks.generate_dataset(m) for m in members]
    vecs, alone = [], []
    for m, train in zip(members, trains):
        vecs.append(finetune(tiny, train, cfg.finetune, seed=m.seed).final.update)  # (L_tiny, d_tiny)
        tiny_ft = score_model(tiny.model, tiny.tokenizer, test).to_dict()
        alone.append({"tiny": tiny_ft, "translated": score_update(llm, translate(vecs[-1][None])[0], test).to_dict()})
    rounds = {}
    for n in c.sizes:
        rounds[str(n)] = score_round(cfg, vecs[:n], alone[:n], [ex for t in trains[:n] for ex in t], members[0].seed,
                                     tiny, llm, translate, test)
    robust = score_attacks(cfg, vecs, llm, translate, test, norm_bound)
    return {"seed": seed, "group": g, "task": {"mixture": task.mixture, "secrets": task.secrets, "secret_k": task.secret_k},
            "member_seeds": [m.seed for m in members], "alone": alone, "rounds": rounds, "robust": robust,
            "llm_base": score_update(llm, torch.zeros(llm.layout.shape), test).to_dict()}


def score_round(cfg: ExperimentConfig, vecs: list[torch.Tensor], alone: list[dict], union: list[tasks.Example],
                seed: int, tiny: LoadedModel, llm: LoadedModel, translate: Translate, test: list[tasks.Example]) -> dict:
    """The rows of one round of ``len(vecs)`` members; each value a Scores dict."""
    n, shape = len(vecs), llm.layout.shape
    counts = [cfg.collab.n_examples] * n
    row = lambda acc: {"accuracy": acc}  # noqa: E731  (member rows: accuracy only)
    acc = [{k: a[k]["accuracy"] for k in ("tiny", "translated")} for a in alone]
    out = {"member_tiny_mean": row(statistics.fmean(a["tiny"] for a in acc)),
           "member_tiny_best": row(max(a["tiny"] for a in acc)),
           "member_translated_mean": row(statistics.fmean(a["translated"] for a in acc)),
           "member_translated_best": row(max(a["translated"] for a in acc)),
           "best_member": row(max(max(a["tiny"], a["translated"]) for a in acc))}
    agg = compute_round_update(RoundSpec(rule="mean"), vecs, counts, translate, shape).update  # (L_llm, d_llm)
    out["agg_then_translate"] = score_update(llm, agg, test).to_dict()
    translated = compute_round_update(RoundSpec(rule="mean", mode="translate_then_aggregate", weight_space=True), vecs,
                                      counts, translate, shape).translated  # (n, L_llm, d_llm)
    out["translate_then_mean"] = score_update(llm, translated.mean(0), test).to_dict()
    out["weight_space"] = score_weight_space(llm, translated, test).to_dict()
    finetune(tiny, union, cfg.finetune, seed=seed)
    out["tiny_union"] = score_model(tiny.model, tiny.tokenizer, test).to_dict()
    finetune(llm, union, cfg.finetune, seed=seed)
    out["llm_union"] = score_model(llm.model, llm.tokenizer, test).to_dict()
    return out


def score_weight_space(llm: LoadedModel, translated: torch.Tensor, test: list[tasks.Example]) -> Scores:
    """Score the adapter the service exports for a ``weight_space`` round: the card's LLM
    with the stacked rank ``n r`` LoRA whose product is the mean of the ``n`` products.

    Args:
        llm: the card's LLM (gives the LoRA config, layout, init and base weights).
        translated: ``(n, L_llm, d_llm)`` LLM update vectors.
        test: the examples to score.
    """
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="gtr-ws-") as tmp:
        write_stacked_adapter(tmp, llm, translated)
        base, _ = load_model(llm.path)
        model = PeftModel.from_pretrained(base, tmp)
        return score_model(model, llm.tokenizer, test)


def attack(v: torch.Tensor, kind: str, scale: float) -> torch.Tensor:
    """What the attacker sends instead of its honest update ``v``."""
    if kind == "scale":
        return v * scale
    if kind == "sign_flip":
        return -v
    raise ValueError(f"unknown attack {kind!r}; expected one of {ATTACKS}")


def score_attacks(cfg: ExperimentConfig, vecs: list[torch.Tensor], llm: LoadedModel, translate: Translate,
                  test: list[tasks.Example], norm_bound: NormBound | None) -> dict:
    """Accuracy of the clean round and of each attacked round, per rule (aggregate then translate)."""
    c = cfg.collab
    n, shape = max(c.sizes), llm.layout.shape
    vecs = vecs[:n]
    out: dict = {"n": n, "attacker": n - 1}
    rounds = {"clean": vecs, **{a: vecs[:-1] + [attack(vecs[-1], a, c.attack_scale)] for a in ATTACKS}}
    for name, vs in rounds.items():
        out[name] = {}
        for rule in RULES:
            spec = RoundSpec(rule=rule, trim_fraction=c.trim_fraction)
            update = compute_round_update(spec, vs, [c.n_examples] * n, translate, shape).update
            out[name][rule] = score_update(llm, update, test).accuracy
    out["refused_by_norm_bound"] = {a: refused(rounds[a][-1], norm_bound) for a in ATTACKS} if norm_bound else None
    return out


def refused(v: torch.Tensor, bound: NormBound) -> bool:
    """Whether the service's input-norm bound refuses ``v`` in a round without ``accept_outliers``."""
    try:
        check_update_content(v, bound)
    except ValueError:
        return True
    return False


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(groups: list[dict], sizes: list[int]) -> dict:
    """Mean +- std over the groups, and the issue's targets."""
    table = {str(n): {r: mean_std([g["rounds"][str(n)][r]["accuracy"] for g in groups]) for r in ROUND_ROWS} for n in sizes}
    robust = {name: {rule: mean_std([g["robust"][name][rule] for g in groups]) for rule in RULES}
              for name in ("clean", *ATTACKS)}
    agg = [table[str(n)]["agg_then_translate"]["mean"] for n in sizes]
    top = str(sizes[-1])
    per_group_beats = {r: sum(g["rounds"][top][r]["accuracy"] > g["rounds"][top]["best_member"]["accuracy"] for g in groups)
                       for r in ("agg_then_translate", "weight_space")}
    robust_delta = {a: {rule: robust[a][rule]["mean"] - robust["clean"][rule]["mean"] for rule in RULES} for a in ATTACKS}
    within = {a: {rule: abs(d) <= ROBUST_TOLERANCE for rule, d in deltas.items()} for a, deltas in robust_delta.items()}
    refusals = [g["robust"]["refused_by_norm_bound"] for g in groups if g["robust"]["refused_by_norm_bound"] is not None]
    targets = {
        "aggregate_improves_with_n": all(b > a for a, b in zip(agg, agg[1:])),
        f"aggregate_beats_best_member_at_n{top}": table[top]["agg_then_translate"]["mean"] > table[top]["best_member"]["mean"],
        f"groups_where_aggregate_beats_best_member_at_n{top}": per_group_beats["agg_then_translate"],
        f"groups_where_weight_space_beats_best_member_at_n{top}": per_group_beats["weight_space"],
        "robust_rules_within_tolerance": {a: within[a]["median"] and within[a]["trimmed_mean"] for a in ATTACKS},
        "mean_outside_tolerance": {a: not within[a]["mean"] for a in ATTACKS},
    }
    return {"table": table, "robust": robust, "llm_base": mean_std([g["llm_base"]["accuracy"] for g in groups]), "robust_delta": robust_delta, "robust_tolerance": ROBUST_TOLERANCE,
            "attacker_refused_by_norm_bound": {a: sum(r[a] for r in refusals) for a in ATTACKS} if refusals else None,
            "n_groups": len(groups), "targets": targets}


def format_results(out: dict) -> str:
    sizes = out["sizes"]
    n_seeds = len(out["seeds"])
    lines = [f"{out['n_groups']} groups ({n_seeds} seeds x {out['n_groups'] // n_seeds}), {out['n_examples']} private "
             f"examples per organization, {out['n_test']} test examples per group; accuracy, mean +- std over groups "
             f"(LLM base: {out['llm_base']['mean']:.3f})",
             "| row | " + " | ".join(f"N = {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for r in ROUND_ROWS:
        lines.append(f"| {LABELS[r]} | " + " | ".join(f"{out['table'][str(n)][r]['mean']:.3f} +- {out['table'][str(n)][r]['std']:.3f}"
                                                      for n in sizes) + " |")
    rob = out["robust"]
    lines += ["", f"Robust aggregation, N = {sizes[-1]}, one attacker (x{out['attack_scale']:g} or sign flip); "
              f"aggregate then translate; trimmed mean trims {out['trim_fraction']:g} at each end",
              "| rule | clean round | scaled x{:g} (change) | sign flip (change) |".format(out["attack_scale"]), "|---|---|---|---|"]
    for rule in RULES:
        cells = [f"{rob[a][rule]['mean']:.3f} ({out['robust_delta'][a][rule]:+.3f})" for a in ATTACKS]
        lines.append(f"| {rule} | {rob['clean'][rule]['mean']:.3f} | " + " | ".join(cells) + " |")
    refusals = out["attacker_refused_by_norm_bound"]
    if refusals is not None:
        lines.append(f"The service's input-norm bound refuses the attacker's vector in a mean round: scaled in "
                     f"{refusals['scale']} of {out['n_groups']} groups, sign flip in {refusals['sign_flip']}.")
    t = out["targets"]
    top = sizes[-1]
    yn = lambda b: "yes" if b else "NO"  # noqa: E731
    lines += ["", f"Target: the aggregate improves with N -> {yn(t['aggregate_improves_with_n'])}; at N = {top} it beats the "
              f"best single member -> {yn(t[f'aggregate_beats_best_member_at_n{top}'])} on average, in "
              f"{t[f'groups_where_aggregate_beats_best_member_at_n{top}']} of {out['n_groups']} groups (weight-space aggregate: "
              f"{t[f'groups_where_weight_space_beats_best_member_at_n{top}']}).",
              "Target: median and trimmed mean within {:.2f} of their clean round -> {}; the plain mean outside it -> {}.".format(
                  out["robust_tolerance"], ", ".join(f"{a} {yn(v)}" for a, v in t["robust_rules_within_tolerance"].items()),
                  ", ".join(f"{a} {yn(v)}" for a, v in t["mean_outside_tolerance"].items()))]
    return "\n".join(lines)


def write_plot(path: Path, out: dict) -> None:
    """Accuracy against N per row (left) and the robust rows (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = out["sizes"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for r in ("member_tiny_mean", "member_translated_mean", "best_member", "agg_then_translate", "weight_space",
              "tiny_union", "llm_union"):
        mean = [out["table"][str(n)][r]["mean"] for n in sizes]
        std = [out["table"][str(n)][r]["std"] for n in sizes]
        ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=LABELS[r])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("organizations in the round (N)")
    ax.set_ylabel("accuracy on the shared task")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    ax.set_title(f"{out['n_groups']} groups, {out['n_examples']} examples per organization", fontsize=9)
    width = 0.25
    for i, name in enumerate(("clean", *ATTACKS)):
        bx.bar([j + (i - 1) * width for j in range(len(RULES))], [out["robust"][name][r]["mean"] for r in RULES], width,
               yerr=[out["robust"][name][r]["std"] for r in RULES], capsize=2, label=name)
    bx.set_xticks(range(len(RULES)), RULES)
    bx.set_ylim(0, 1)
    bx.set_title(f"N = {sizes[-1]}, one attacker", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = base_parser("Collaboration of organizations with one task and few examples each; robust aggregation").parse_args(argv)
    run(load_config(args.config))
