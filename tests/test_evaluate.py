import math
from pathlib import Path

import pytest
import torch

from gt_ray import tasks
from gt_ray.evaluate import Scores, pgr, pgr_base, proxy_tuning_logits, score, score_update, shares_vocabulary, summarize
from gt_ray.models import build_char_tokenizer, load_with_lora
from gt_ray.updates import read_lora


def _oracle(tok, right_letters: set[str], p_true: float):
    """A teacher-forced logits function: p_true on the true next answer token where the
    example's first input letter is in ``right_letters``, else p_true/2 (not the argmax)."""
    V = len(tok)
    eq, colon = tok.convert_tokens_to_ids("="), tok.convert_tokens_to_ids(":")

    def fn(ids, mask):
        B, T = ids.shape
        logits = torch.full((B, T, V), -1e4)
        for b in range(B):
            row = ids[b].tolist()
            right = tok.convert_ids_to_tokens(row[row.index(colon) + 1]) in right_letters
            for t in range(row.index(eq), int(mask[b].sum()) - 1):
                y = row[t + 1]
                probs = torch.full((V,), 1e-12)
                probs[y] = p_true if right else p_true / 2
                probs[(y + 1) % V] = 1 - probs[y]
                logits[b, t] = probs.log()
        return logits

    return fn


def test_score_of_a_known_model_gives_known_figures():
    tok = build_char_tokenizer()
    examples = tasks.generate_dataset(tasks.DatasetSpec("public", 3, {"index": 1.0}, 20, 1))  # answers: 1 char + ';'
    right = set("abcdefgh")
    n_right = sum(ex.prompt[3] in right for ex in examples)
    assert 0 < n_right < len(examples)
    s = score(_oracle(tok, right, p_true=0.8), tok, examples, batch_size=3)
    assert s.accuracy == pytest.approx(n_right / len(examples))
    n_wrong = len(examples) - n_right  # 2 answer tokens each
    assert s.nll == pytest.approx((2 * n_right * -math.log(0.8) + 2 * n_wrong * -math.log(0.4)) / (2 * len(examples)), rel=1e-5)


def test_pgr_formulas():
    assert pgr(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert pgr(0.6, 0.6, 1.0) == 0.0 and pgr(1.0, 0.6, 1.0) == 1.0
    assert pgr_base(0.55, 0.1, 1.0) == pytest.approx(0.5)
    assert math.isnan(pgr(0.5, 0.7, 0.7))
    # NLL: lower is better, same formula
    assert pgr(1.5, 2.0, 1.0) == pytest.approx(0.5)


def test_summarize_uses_organization_averages():
    def s(a):
        return Scores(accuracy=a, nll=1 - a, n=10)

    out = summarize({"llm_base": [s(0.0), s(0.2)], "tiny_ft": [s(0.5), s(0.7)], "llm_ft": [s(1.0), s(0.8)],
                     "m": [s(0.9), s(0.7)]})
    # averages: base .1, tiny .6, llm .9, m .8 -> PGR (.8-.6)/(.9-.6) = 2/3; PGR_base (.8-.1)/(.9-.1)
    assert out["m"]["pgr_accuracy"] == pytest.approx(2 / 3)
    assert out["m"]["pgr_base_accuracy"] == pytest.approx(0.7 / 0.8)
    assert out["m"]["pgr_nll"] == pytest.approx(2 / 3)


def test_proxy_tuning_is_the_stated_logit_combination(tiny_path, lora):
    tiny = load_with_lora(tiny_path, lora, seed=7)
    llm = load_with_lora(tiny_path, lora, seed=8)  # same vocabulary; its own (untouched) init
    update = torch.randn(tiny.layout.shape, generator=torch.Generator().manual_seed(0)) * 0.2
    from gt_ray.updates import apply_update

    apply_update(tiny.model, tiny.layout, tiny.init, update)
    ids = torch.randint(1, 30, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = proxy_tuning_logits(llm.model, tiny.model)(ids, mask)
        ft = tiny.model(input_ids=ids).logits
        with tiny.model.disable_adapter():
            base_t = tiny.model(input_ids=ids).logits
        with llm.model.disable_adapter():
            base_l = llm.model(input_ids=ids).logits
    torch.testing.assert_close(got, base_l + ft - base_t)
    assert (ft - base_t).abs().max() > 1e-4  # the fine-tuned TinyLM really differs from its base
    # the TinyLM kept its fine-tuned LoRA (disable_adapter is a context, not a reset)
    torch.testing.assert_close(read_lora(tiny.model, tiny.layout), tiny.init + update)


def test_score_update_applies_on_top_of_the_init(tiny_path, lora):
    lm = load_with_lora(tiny_path, lora, seed=7)
    examples = tasks.generate_dataset(tasks.DatasetSpec("public", 3, {"add": 1.0}, 16, 1))
    zero = score_update(lm, torch.zeros(lm.layout.shape), examples)
    lm.reset()
    from gt_ray.evaluate import score_model

    assert zero.nll == pytest.approx(score_model(lm.model, lm.tokenizer, examples).nll, abs=1e-6)
    moved = score_update(lm, torch.ones(lm.layout.shape) * 0.3, examples)
    assert moved.nll != pytest.approx(zero.nll, abs=1e-4)


def test_shares_vocabulary():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    char = build_char_tokenizer()
    assert shares_vocabulary(char, build_char_tokenizer())
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, unk_token="<pad>")))
    assert not shares_vocabulary(char, other)


def test_results_table_names_why_proxy_tuning_was_skipped():
    from gt_ray.config import load_yaml
    from jobs.evaluate import PROXY_SKIPPED, combine, format_results

    def s(a):
        return Scores(accuracy=a, nll=1 - a, n=10)

    methods = ["llm_base", "tiny_ft", "llm_ft", "grad_transformer", "mean_shadow", "ridge", "nearest_neighbour"]
    summary = summarize({m: [s(0.1 * (i + 1))] for i, m in enumerate(methods)})
    multi = {"agg_then_translate": {"accuracy": 0.5, "nll": 1.0}}
    orgs = [{"secret_k": 3, "seen": True, "accuracy": {m: 0.5 for m in methods}}]
    per_seed = {0: {"summary": summary, "multi": multi, "orgs": orgs, "provider_seconds": {"grad_transformer": 0.01}}}
    root = Path(__file__).resolve().parents[1]
    out = combine(per_seed, load_yaml(root / "configs/ci.yaml"), shared_vocab=False)
    assert out["proxy_tuning"] == PROXY_SKIPPED and "proxy_tuning" not in out["methods"]
    assert f"| proxy-tuning | {PROXY_SKIPPED} | | | |" in format_results(out).splitlines()
    assert "unseen combinations: no organization" in format_results(out)


def test_pgr_is_the_ratio_of_seed_averaged_accuracies_with_counts_and_groups():
    from gt_ray.config import load_yaml
    from jobs.evaluate import combine, format_results

    methods = ["llm_base", "tiny_ft", "llm_ft", "grad_transformer", "mean_shadow", "ridge", "nearest_neighbour"]
    # seed 0: a tiny gap (PGR 5.0); seed 1: a wide one (PGR 0.5)
    acc = {0: dict(llm_base=0.0, tiny_ft=0.60, llm_ft=0.62, grad_transformer=0.70, mean_shadow=0.0, ridge=0.1,
                   nearest_neighbour=0.8),
           1: dict(llm_base=0.0, tiny_ft=0.40, llm_ft=1.00, grad_transformer=0.70, mean_shadow=0.0, ridge=0.1,
                   nearest_neighbour=0.5)}
    per_seed = {}
    for seed, a in acc.items():
        orgs = [{"seen": seed == 0, "accuracy": {**a, "public_ft": 0.9} if seed == 0 else a}]
        per_seed[seed] = {"summary": summarize({m: [Scores(a[m], 1 - a[m], 10)] for m in methods}),
                          "multi": {"x": {"accuracy": 0.5, "nll": 1.0}}, "orgs": orgs,
                          "provider_seconds": {"grad_transformer": 0.01 * (seed + 1), "kd_sequence": 8.0 + seed}}
    out = combine(per_seed, load_yaml(Path(__file__).resolve().parents[1] / "configs/ci.yaml"), shared_vocab=False)
    gt = out["methods"]["grad_transformer"]
    # (0.70 - 0.50) / (0.81 - 0.50), not the mean of the per-seed ratios (2.75)
    assert gt["pgr_accuracy"] == pytest.approx(0.2 / 0.31)
    assert gt["per_seed_pgr_accuracy"] == pytest.approx(2.75)
    assert gt["pgr_base_accuracy"] == pytest.approx(0.70 / 0.81)
    assert out["counts"] == {"n": 2, "beats_nearest_neighbour": 1, "ties_nearest_neighbour": 0, "beats_tiny_ft": 2,
                             "below_tiny_ft_by_more_than_0.2": 0, "llm_ft_failed_below_0.5": 0}
    assert out["groups"]["seen"]["n_orgs"] == 1 and out["groups"]["unseen"]["n_orgs"] == 1
    assert out["groups"]["unseen"]["pgr_accuracy"]["grad_transformer"] == pytest.approx(0.5)
    # the paper's setting (seen) also scores the LLM fine-tuned on public data of the org's distribution
    assert out["groups"]["seen"]["accuracy"]["public_ft"] == 0.9 and "public_ft" not in out["groups"]["unseen"]["accuracy"]
    assert out["provider_seconds_per_org"] == pytest.approx({"grad_transformer": 0.015, "kd_sequence": 8.5})
    assert "| LLM fine-tuned on public data of the org's distribution | 0.900 |" in format_results(out)


def test_secret_probe_reads_the_secret_off_update_vectors():
    from gt_ray.evaluate import SecretProbe

    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 2, 6, generator=g)  # one direction per secret
    k = torch.randint(0, 4, (200,), generator=g)
    x = directions[k] * 0.01 + 0.01 * torch.randn(200, 2, 6, generator=g)
    probe = SecretProbe(4).fit(x[:150], k[:150])
    assert (probe.predict(x[150:]) == k[150:]).float().mean() > 0.9
    noise = torch.randn(200, 2, 6, generator=g)  # no signal: about chance
    assert (SecretProbe(4).fit(noise[:150], k[:150]).predict(noise[150:]) == k[150:]).float().mean() < 0.6


def test_seen_organizations_hold_a_training_subsets_combination_on_private_data():
    import dataclasses
    import random

    from gt_ray.config import load_yaml
    from jobs.evaluate import org_specs

    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs/ci.yaml")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_orgs=6, seen_fraction=0.5))
    train = [tasks.draw_dataset_spec(random.Random(i), "public", cfg.tasks.names, 64, 0.5, True) for i in range(4)]
    specs = org_specs(cfg, 0, train)
    combos = {t.combination() for t in train}
    assert all(s.split == "private_train" for s in specs)
    assert all(s.combination() in combos for s in specs[:3])
    assert all(s.seed not in {t.seed for t in train} for s in specs)  # its own data, not the subset's
    assert org_specs(cfg, 0, train) == specs and org_specs(cfg, 1, train) != specs


def test_kd_rows_follow_the_config_and_the_vocabulary():
    import dataclasses

    from gt_ray.config import EvalConfig, load_yaml
    from jobs.evaluate import org_methods

    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs/ci.yaml")
    assert {"proxy_tuning", "kd_sequence", "kd_logit"} <= set(org_methods(cfg, shared_vocab=True))
    two_vocabs = org_methods(cfg, shared_vocab=False)
    assert "kd_sequence" in two_vocabs and "kd_logit" not in two_vocabs and "proxy_tuning" not in two_vocabs
    off = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, kd=[]))
    assert not any(m.startswith("kd_") for m in org_methods(off, shared_vocab=True))
    with pytest.raises(ValueError, match="kd must list distinct modes out of sequence, logit"):
        EvalConfig(kd=["soft"])


def _synthetic_per_seed(per_task: dict[str, dict[str, float]], translator_seeds: dict[int, float] | None = None) -> dict:
    """Two seeds x 6 organizations (3 seen, 3 new) whose accuracy is exactly the mixture-weighted
    per-task accuracy; with ``translator_seeds`` (seed -> offset) the translator holds one
    accuracy per translator seed and their mean."""
    import random

    names = list(next(iter(per_task.values())))
    per_seed = {}
    for seed in (0, 1):
        orgs = []
        for j in range(6):
            rng = random.Random(f"{seed}|{j}")
            raw = [rng.random() + 0.05 for _ in names]
            mixture = {t: x / sum(raw) for t, x in zip(names, raw)}
            acc = {m: sum(mixture[t] * a[t] for t in names) for m, a in per_task.items()}
            org = {"seen": j < 3, "mixture": mixture, "accuracy": acc}
            if translator_seeds:
                by = {s: acc["grad_transformer"] + d for s, d in translator_seeds.items()}
                org["accuracy_by_translator_seed"] = {"grad_transformer": by}
                acc["grad_transformer"] = sum(by.values()) / len(by)
            orgs.append(org)
        methods = list(per_task)
        per_seed[seed] = {"summary": summarize({m: [Scores(o["accuracy"][m], 1.0, 10) for o in orgs] for m in methods}),
                          "multi": {"x": {"accuracy": 0.5, "nll": 1.0}}, "orgs": orgs,
                          "provider_seconds": {"grad_transformer": 0.01}}
    return per_seed


PER_TASK = {"llm_base": {"add": 0.0, "index": 0.1, "rotate": 0.0, "caesar": 0.05, "delete": 0.0},
            "tiny_ft": {"add": 0.9, "index": 0.95, "rotate": 0.4, "caesar": 0.0, "delete": 1.0},
            "llm_ft": {"add": 1.0, "index": 0.9, "rotate": 0.95, "caesar": 1.0, "delete": 1.0},
            "grad_transformer": {"add": 0.75, "index": 0.45, "rotate": 0.8, "caesar": 0.0, "delete": 0.6},
            "nearest_neighbour": {"add": 1.0, "index": 0.5, "rotate": 0.85, "caesar": 0.7, "delete": 0.35},
            "mean_shadow": {"add": 0.0, "index": 0.1, "rotate": 0.0, "caesar": 0.1, "delete": 0.1},
            "ridge": {"add": 0.4, "index": 0.3, "rotate": 0.2, "caesar": 0.1, "delete": 0.3}}


def test_org_report_has_groups_per_task_split_and_intervals():
    from gt_ray.config import load_yaml
    from jobs.evaluate import combine, format_results

    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs/ci.yaml")
    out = combine(_synthetic_per_seed(PER_TASK), cfg, shared_vocab=False)
    report = out["org_report"]
    assert report["bootstrap"] == {"n_boot": 10_000, "seed": 0, "level": 0.95, "unit": "organization"}
    assert {g: e["n_orgs"] for g, e in report["groups"].items()} == {"all": 12, "seen": 6, "new": 6}
    orgs = [o for s in out["per_seed"].values() for o in s["orgs"]]
    for group, e in report["groups"].items():
        members = [o for o in orgs if group == "all" or o["seen"] == (group == "seen")]
        # no kd_logit in this run: only the comparisons that exist
        assert set(e["intervals"]) == {"grad_transformer_minus_tiny_ft", "grad_transformer_minus_nearest_neighbour"}
        iv = e["intervals"]["grad_transformer_minus_tiny_ft"]
        diff = [o["accuracy"]["grad_transformer"] - o["accuracy"]["tiny_ft"] for o in members]
        assert iv["n"] == len(members) and iv["mean_diff"] == pytest.approx(sum(diff) / len(diff))
        assert iv["lo"] <= iv["mean_diff"] <= iv["hi"]
        for m, truth in PER_TASK.items():  # noiseless records: the split is exact
            assert e["per_task"]["accuracy"][m] == pytest.approx(truth, abs=1e-9)
        assert sum(e["per_task"]["weight"].values()) == pytest.approx(len(members))
        assert "translator_seed_spread" not in e
    assert out["groups"]["unseen"]["n_orgs"] == 6  # the older keys are still there
    text = format_results(out)
    assert "| translator minus | all | seen | new |" in text
    assert "Per-task accuracy, new organizations (6)" in text
    assert "| LLM + Grad-Transformer | 0.75 | 0.45 | 0.80 | 0.00 | 0.60 |" in text  # add index rotate caesar delete


def test_org_report_with_several_translator_seeds_uses_the_org_mean_and_shows_the_spread():
    from gt_ray.config import load_yaml
    from jobs.evaluate import combine, format_org_report, org_report

    cfg = load_yaml(Path(__file__).resolve().parents[1] / "configs/ci.yaml")
    offsets = {0: -0.05, 1: 0.0, 2: 0.08}
    out = combine(_synthetic_per_seed(PER_TASK, offsets), cfg, shared_vocab=False)
    single = combine(_synthetic_per_seed(PER_TASK), cfg, shared_vocab=False)
    for group, e in out["org_report"]["groups"].items():
        base = single["org_report"]["groups"][group]
        spread = e["translator_seed_spread"]["grad_transformer"]
        mean = base["accuracy"]["grad_transformer"]
        assert spread["n_seeds"] == 3
        assert spread["min"] == pytest.approx(mean - 0.05) and spread["max"] == pytest.approx(mean + 0.08)
        assert e["accuracy"]["grad_transformer"] == pytest.approx(mean + 0.01)
        iv = e["intervals"]["grad_transformer_minus_tiny_ft"]
        assert iv["mean_diff"] == pytest.approx(base["intervals"]["grad_transformer_minus_tiny_ft"]["mean_diff"] + 0.01)
        assert iv["n"] == base["intervals"]["grad_transformer_minus_tiny_ft"]["n"]  # organizations, not org x seed rows
    all_ = out["org_report"]["groups"]["all"]
    s = all_["translator_seed_spread"]["grad_transformer"]
    assert f"| LLM + Grad-Transformer | {all_['accuracy']['grad_transformer']:.3f} [{s['min']:.3f}, {s['max']:.3f}] |" \
        in format_org_report(out["org_report"])
    orgs = [o for o in out["per_seed"][0]["orgs"]]
    orgs[0] = {**orgs[0], "accuracy": {**orgs[0]["accuracy"], "grad_transformer": 0.0}}
    with pytest.raises(ValueError, match="grad_transformer: accuracy must be the mean of accuracy_by_translator_seed"):
        org_report(orgs, list(PER_TASK))
    orgs[0] = {**orgs[1], "accuracy": {**orgs[1]["accuracy"], "grad_transformer": 0.5},
               "accuracy_by_translator_seed": {"grad_transformer": {0: 0.5}}}  # one seed where the others hold three
    with pytest.raises(ValueError, match="every organization must hold the translator seeds"):
        org_report(orgs, list(PER_TASK))


def test_a_seed_without_a_gap_leaves_its_pgr_spread_nan():
    import math

    from gt_ray.config import load_yaml
    from jobs.evaluate import combine

    methods = ["llm_base", "tiny_ft", "llm_ft", "grad_transformer", "mean_shadow", "ridge", "nearest_neighbour"]
    per_seed = {seed: {"summary": summarize({m: [Scores(0.5 if m == "llm_ft" and seed else 0.0, 1.0, 10)] for m in methods}),
                       "multi": {"x": {"accuracy": 0.5, "nll": 1.0}}, "orgs": [{"seen": False, "accuracy": {m: 0.0 for m in methods}}],
                       "provider_seconds": {"grad_transformer": 0.01}} for seed in (0, 1)}  # seed 0: TinyLM and LLM tie
    out = combine(per_seed, load_yaml(Path(__file__).resolve().parents[1] / "configs/ci.yaml"), shared_vocab=False)
    assert math.isnan(out["methods"]["grad_transformer"]["per_seed_pgr_accuracy_std"])
    assert out["methods"]["grad_transformer"]["accuracy_std"] == 0.0
