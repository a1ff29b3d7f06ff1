"""The validation report: every finding per file, shown to a person grouped by reason.

A dataset of 10,000 upscaled CIFAR images has one thing to say ("10,000 small images, upscaled"), not 10,000 table
rows, and the three broken files must not drown under them. So the report shows one line per reason (errors
first, then warnings, then info), its count and a few of its files; every file is in the CSV/JSON that `save`
writes beside it.

Severities: "error" = the record cannot be used (dropped, or validation stops); "warning" = used but changed
(converted, upscaled, truncated) or dropped as a duplicate; "info" = harmless, said so nothing happens silently.
"""
from __future__ import annotations

import csv
import html
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

SEVERITIES = ("error", "warning", "info")
CSV_NAME, JSON_NAME = "validation_report.csv", "validation_report.json"
EXAMPLES = 3  # files named per group on screen (a group of EXAMPLES + 1 names them all)


@dataclass(frozen=True)
class Issue:
    key: str  # which file / record
    severity: str  # "error", "warning" or "info"
    reason: str  # the same sentence for every file of its kind: the report groups by it
    code: str = ""  # short category for counting: "truncated", "long_caption", ...
    detail: str = ""  # what is particular to this file: its size, the failing bytes, the metadata line

    @property
    def text(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass
class Group:
    severity: str
    code: str
    reason: str
    issues: list[Issue]


def _folder_of(keys: list[str]) -> str:
    """The deepest folder every key lies in ("" when they share none), so the report can name files briefly."""
    try:
        return os.path.commonpath([os.path.dirname(k) for k in keys]).rstrip(os.sep) if keys else ""
    except ValueError:  # absolute and relative keys mixed
        return ""


class DatasetError(ValueError):
    """The dataset cannot be used as it is; the message says which files and why."""


@dataclass(repr=False)  # the default repr would spell out every record: IPython computes it beside the HTML
class ValidationReport:
    records: list  # usable helpers.data.validation.Records, in source order
    issues: list[Issue] = field(default_factory=list)
    checked: int = 0  # images looked at (not caption files without an image, nor notes about metadata files)

    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def groups(self) -> list[Group]:
        """Issues by (severity, code, reason): errors first, then the largest groups."""
        by_kind: dict[tuple[str, str, str], list[Issue]] = {}
        for i in self.issues:
            by_kind.setdefault((i.severity, i.code, i.reason), []).append(i)
        groups = [Group(s, c, r, found) for (s, c, r), found in by_kind.items()]
        return sorted(groups, key=lambda g: (SEVERITIES.index(g.severity), -len(g.issues), g.code))

    def headline(self) -> str:
        tally = ", ".join(f"{sum(i.severity == s for i in self.issues)} {s}{'s' if s != 'info' else ''}"
                          for s in SEVERITIES)
        return (f"{self.checked} images checked: {len(self.records)} usable, {self.checked - len(self.records)} "
                f"dropped · {tally}")

    def _shown(self, group: Group, limit: int, root: str) -> tuple[list[tuple[str, str]], int]:
        """(file, detail) of the first files of `group`, paths relative to `root`, and how many are left unnamed."""
        shown = group.issues if len(group.issues) <= limit + 1 else group.issues[:limit]
        short = (lambda text: text.replace(root + os.sep, "")) if root else (lambda text: text)
        return [(short(i.key), short(i.detail)) for i in shown], len(group.issues) - len(shown)

    def summary(self, severities: tuple[str, ...] = SEVERITIES, examples: int = EXAMPLES) -> str:
        """The report as text: a headline, then one block per reason with its count and first files."""
        root = _folder_of([i.key for i in self.issues])
        lines = [self.headline()]
        if self.issues:
            lines += [(f"files under {root}/ · " if root else "") + f"one row per file: {CSV_NAME} (report.save)", ""]
        for g in (g for g in self.groups() if g.severity in severities):
            lines.append(f"{g.severity.upper():<7} {len(g.issues):>5} × {g.reason}")
            named, more = self._shown(g, examples, root)
            lines += [f"{'':16}{name}: {detail}" if detail else f"{'':16}{name}" for name, detail in named]
            lines += [f"{'':16}… and {more} more"] if more else []
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<ValidationReport: {self.headline()}>"

    def _repr_html_(self) -> str:
        colors = {"error": "#fdd", "warning": "#ffd", "info": "#eef"}
        left = "style='text-align:left; vertical-align:top'"  # Jupyter right-aligns table cells by default
        root = _folder_of([i.key for i in self.issues])
        rows = []
        for g in self.groups():
            named, more = self._shown(g, EXAMPLES, root)
            files = "<br>".join(f"<code>{html.escape(name)}</code> {html.escape(detail)}" for name, detail in named)
            files += f"<br><i>… and {more} more</i>" if more else ""
            rows.append(f"<tr style='background:{colors[g.severity]}'><td {left}>{g.severity}</td>"
                        f"<td style='text-align:right; vertical-align:top'>{len(g.issues)}</td>"
                        f"<td {left}>{html.escape(g.reason)}</td><td {left}>{files}</td></tr>")
        where = f"files under <code>{html.escape(root)}/</code> · " if root else ""
        head = f"<p><b>{html.escape(self.headline())}</b>"
        if not rows:
            return head + "</p>"
        return (f"{head}<br>{where}one row per file: {CSV_NAME}</p><table><tr><th {left}>severity</th>"
                f"<th>files</th><th {left}>reason</th><th {left}>which files</th></tr>{''.join(rows)}</table>")

    def raise_errors(self) -> None:
        """DatasetError naming every file with an error (up to 20 per reason), grouped like the report."""
        if self.errors():
            error = DatasetError(f"{len(self.errors())} errors (fix or remove these files, or use on_error='skip'):\n"
                                 + self.summary(severities=("error",), examples=20))
            error.report = self  # a caller of validate(on_error="stop") can still save() the whole table
            raise error

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write validation_report.csv (one row per issue) and validation_report.json (issues + groups)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = folder / CSV_NAME, folder / JSON_NAME
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["key", "severity", "code", "reason", "detail"])
            writer.writeheader()
            writer.writerows(asdict(i) for i in self.issues)
        json_path.write_text(json.dumps({
            "checked": self.checked, "usable": len(self.records), "issues": [asdict(i) for i in self.issues],
            "groups": [{"severity": g.severity, "code": g.code, "reason": g.reason, "count": len(g.issues)}
                       for g in self.groups()]}, indent=1, ensure_ascii=False), encoding="utf-8")
        return csv_path, json_path
