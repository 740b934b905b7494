"""The prompt templates (`templates.yaml`) and the text forms of titles, lists and percentages."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

TEMPLATES_FILE = Path(__file__).with_name("templates.yaml")

# The placeholders each template may use; loading fails on any other (a typo would otherwise surface as a
# KeyError deep inside sample generation).
_FIELDS = {
    "title_in_prompt": {"title"},
    "response_line": {"index", "title"},
    "percentage": {"percent"},
    "seqrec": {"history", "item_count", "candidate_titles"},
    "control": {"history", "item_count", "candidate_titles", "synthetic_intention"},
    "proportion": {"history", "item_count", "proportion_intention"},
    "proportion_intentions": {"target_category", "category_proportion"},
    "search": {"item_count", "candidate_titles", "synthetic_intention"},
    "category_question": {"item"},
    "intentions": {"target_category"},
    "combined_intention": {"first", "second"},
}
PROPORTION_KEYS = ("<=", ">=", "~")


@dataclass(frozen=True)
class Templates:
    raw: dict

    def prompt(self, group: str, form: str, **fields) -> str:
        """Fill template `form` ("generate" or "select") of `group` ("seqrec", "control", ...)."""
        return self.raw[group][form].format(**fields)

    def forms(self, group: str) -> tuple[str, ...]:
        return tuple(self.raw[group])

    def titles_in_prompt(self, titles: list[str]) -> str:
        one = self.raw["title_in_prompt"]
        return self.raw["title_separator"].join(one.format(title=t) for t in titles)

    def response(self, titles: list[str]) -> str:
        """The numbered list "1. <title>\\n2. <title>..." (EOS is added by the tokenisation)."""
        line = self.raw["response_line"]
        return "\n".join(line.format(index=i + 1, title=t) for i, t in enumerate(titles))

    def percentage(self, m: float) -> str:
        return self.raw["percentage"].format(percent=f"{100 * m:g}")

    def intentions(self, polarity: str) -> list[str]:
        return self.raw["intentions"][polarity]

    def proportion_intention(self, kind: str, category: str, m: float) -> str:
        return self.raw["proportion_intentions"][kind].format(
            target_category=category, category_proportion=self.percentage(m))

    def combined(self, first: str, second: str) -> str:
        return self.raw["combined_intention"].format(first=first, second=second)

    def category_question(self, title: str) -> str:
        return self.raw["category_question"].format(item=title)


def _check(raw: dict, path: Path) -> None:
    missing = set(_FIELDS) - set(raw)
    if missing:
        raise ValueError(f"{path}: missing template keys {sorted(missing)}")
    if set(raw["proportion_intentions"]) != set(PROPORTION_KEYS):
        raise ValueError(f"{path}: proportion_intentions must have exactly the keys {PROPORTION_KEYS}")
    if set(raw["intentions"]) != {"positive", "negative"} or not all(raw["intentions"].values()):
        raise ValueError(f"{path}: intentions must list positive and negative phrasings")
    for key, allowed in _FIELDS.items():
        node = raw[key]
        texts = (node if isinstance(node, list) else [node]) if not isinstance(node, dict) else list(node.values())
        texts = [t for v in texts for t in (v if isinstance(v, list) else [v])]
        for text in texts:
            used = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            if used - allowed:
                raise ValueError(f"{path}: template {key!r} uses unknown placeholders {sorted(used - allowed)}")


@lru_cache(maxsize=4)
def load_templates(path: str | Path = TEMPLATES_FILE) -> Templates:
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    _check(raw, path)
    return Templates(raw)
