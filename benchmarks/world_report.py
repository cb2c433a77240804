"""The world criteria of several `gt-ray pair report` JSONs side by side (criterion 5: the
world's properties hold for pairs pretrained from different seeds).

    python benchmarks/world_report.py benchmarks/results/pair_report_tiny.json \
        benchmarks/results/pair_report_tiny_seed2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell(c: dict | None, text: str) -> str:
    return "-" if c is None else f"{text} {'pass' if c['pass'] else '**FAIL**'}"


def criteria_table(reports: dict[str, dict]) -> str:
    """One markdown table row per (report, task), and one line per report for criterion 3."""
    lines = ["| seeds (TinyLM, LLM) | task | TinyLM k shown | TinyLM ft hidden (1: ratio) | LLM ft hidden | "
             "2: linear / behavioural probe (n) | 4: distinct |", "|---|---|---|---|---|---|---|"]
    orgs = []
    for label, rep in reports.items():
        crit = rep["criteria"]
        for name, row in crit["tasks"].items():
            s, p, d = row.get("secret_learned"), row.get("secret_readable"), row.get("distinct")
            llm = rep["tasks"].get(name, {}).get("llm", {}).get("hidden_after_ft")
            lines.append(
                f"| {label} | {name} | {s['tiny_k_shown']:.3f} | "
                f"{_cell(s, '{:.3f} ({:.2f})'.format(s['tiny_ft_hidden'], s['ratio']))} | "
                f"{'-' if llm is None else f'{llm:.3f}'} | "
                f"{_cell(p, p and '{:.2f} / {:.2f} ({})'.format(p['linear'], p['behavioural'], p['n_test']))} | "
                f"{_cell(d, d and '{:.3f}'.format(d['min_share']))} |")
        o = crit.get("orgs")
        if o is not None:
            orgs.append(f"| {label} | {rep['mixtures']['n']} | {o['tiny_ft']:.3f} | {o['llm_ft']:.3f} | {o['llm_ft_min']:.3f} | "
                        f"{o['gap']:.3f} | {'pass' if o['pass'] else '**FAIL**'} |")
    if orgs:
        lines += ["", "| seeds (TinyLM, LLM) | mixtures | 3: TinyLM ft | LLM ft | lowest LLM ft | gap | pass |",
                  "|---|---|---|---|---|---|---|", *orgs]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path)
    args = p.parse_args()
    reports = {}
    for path in args.reports:
        rep = json.loads(path.read_text())
        seeds = (rep["models"]["tiny"].get("pretrain_seed"), rep["models"]["llm"].get("pretrain_seed"))
        reports[f"{seeds[0]}, {seeds[1]}"] = rep
    print(criteria_table(reports))


if __name__ == "__main__":
    main()
