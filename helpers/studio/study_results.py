"""What an A/B study's answers say: per prompt set and pooled, each variant's win rate with its Wilson interval, a
sign test of A against B, and how often people agreed with the CLIP score (helpers.studio.study collects them)."""
from __future__ import annotations

from dataclasses import dataclass

from ..evaluation.stats import sign_test, wilson


@dataclass
class StudyResults:
    a: str
    b: str
    rows: list[dict]  # one per prompt set, then "all" (pooled) when there are several

    @property
    def frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def _cells(self) -> list[list[str]]:
        head = ["prompt set", "answers", f"{self.a} wins", f"{self.b} wins", "ties", f"{self.a} win rate [95% CI]",
                f"{self.b} win rate [95% CI]", "sign test p", "agrees with CLIP [95% CI]"]
        cells = [head]
        for r in self.rows:
            def rate(v):
                return "–" if r["n"] == 0 else f"{r[f'rate_{v}']:.2f} [{r[f'low_{v}']:.2f}, {r[f'high_{v}']:.2f}]"
            agree = ("–" if not r["agree_n"] else f"{r['agreement']:.2f} [{r['agree_low']:.2f}, "
                     f"{r['agree_high']:.2f}] of {r['agree_n']}")
            cells.append([r["prompt_set"], str(r["n"]), str(r["wins_a"]), str(r["wins_b"]), str(r["ties"]),
                          rate("a"), rate("b"), f"{r['p']:.2g}", agree])
        return cells

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from html import escape
        head, *body = self._cells()
        th = "".join(f"<th>{escape(c)}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f"<table class='study-results'><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _summary(scope: str, part, a: str, b: str) -> dict:
    wins_a, wins_b = int((part["winner"] == a).sum()), int((part["winner"] == b).sum())
    ties, n = int((part["winner"] == "tie").sum()), len(part)
    rate_a, low_a, high_a = wilson(wins_a + ties / 2, n)
    rate_b, low_b, high_b = wilson(wins_b + ties / 2, n)
    agree = agree_n = 0
    for r in part.to_dict("records"):
        if r["choice"] == "tie":
            continue
        picked, other = ((r["clip_left"], r["clip_right"]) if r["choice"] == "left"
                         else (r["clip_right"], r["clip_left"]))
        if picked != other:
            agree_n += 1
            agree += int(picked > other)
    share, agree_low, agree_high = wilson(agree, agree_n)
    return dict(prompt_set=scope, n=n, wins_a=wins_a, wins_b=wins_b, ties=ties, rate_a=rate_a, low_a=low_a,
                high_a=high_a, rate_b=rate_b, low_b=low_b, high_b=high_b, p=sign_test(wins_a, wins_b),
                agreement=share, agree_n=agree_n, agree_low=agree_low, agree_high=agree_high)


def study_results(answers, a: str, b: str) -> StudyResults:
    """Win rates, sign tests and agreement with CLIP per prompt set and pooled ("all"), by the definitions above."""
    sets = list(dict.fromkeys(answers["prompt_set"]))
    rows = [_summary(s, answers[answers["prompt_set"] == s], a, b) for s in sets]
    if len(sets) != 1:
        rows.append(_summary("all", answers, a, b))
    return StudyResults(a, b, rows)
