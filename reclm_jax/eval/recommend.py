"""What `reclm-jax recommend` asks the model and enforces: the user's intent as data and as the paper's text.

    intent = IntentSpec.from_options(include=["Comedy"], exclude=["Horror"], share="Drama<=20%", categories=...)
    prompt = instruction(templates, history_titles, k, intent.text(templates))

Structured options (`--include`, `--exclude`, `--share "CAT<=20%"`) render the paper's intention phrasings into
the prompt and drive the intent constraint (`llm.constrain.Intent`). A free-text intention is recognised when it
uses the templates' phrasings ("I don't like 'Horror' products", "... proportion of 'Drama' items should be less
than or equal to 20%", two joined by ". "); otherwise it only goes into the prompt. `fit_history` drops the
oldest history items until the prompt fits its token budget; the instruction itself is never cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from reclm_jax.core.controls import PROPORTION_KINDS
from reclm_jax.llm.automaton import Intent

_SHARE = re.compile(r"^\s*(?P<cat>.+?)\s*(?P<kind><=|>=|~)\s*(?P<pct>\d+(?:\.\d+)?)\s*%\s*$")


class IntentError(ValueError):
    """A bad intent option: the message names the option and, for an unknown category, close names."""


def category_id(name: str, categories: list[str], option: str) -> int:
    """The index of category `name` (exact, then case-insensitive); unknown: an error listing close names."""
    from rapidfuzz import process

    if name in categories:
        return categories.index(name)
    folded = [c.casefold() for c in categories]
    if name.casefold() in folded:
        return folded.index(name.casefold())
    near = [c for c, _, _ in process.extract(name, categories, limit=3)]
    raise IntentError(f"{option}: unknown category {name!r}; close ones: {', '.join(near)}")


@dataclass(frozen=True)
class IntentSpec:
    """The user's intent: categories to include, to exclude, and a proportion control (category, kind, m);
    `free_text` is an intention written in other words (only shown to the model)."""

    categories: list[str] = field(repr=False)
    include: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()
    share: tuple[int, str, float] | None = None
    free_text: str | None = None

    @classmethod
    def from_options(cls, categories: list[str], templates, include=(), exclude=(), share: str | None = None,
                     intent: str | None = None) -> "IntentSpec":
        inc = tuple(category_id(c, categories, "--include") for c in include)
        exc = tuple(category_id(c, categories, "--exclude") for c in exclude)
        shr = None
        if share is not None:
            m = _SHARE.match(share)
            if not m:
                raise IntentError(f"--share {share!r}: write CATEGORY then <=, >= or ~ then a percentage, "
                                  "e.g. \"Drama<=20%\"")
            pct = float(m["pct"])
            if pct > 100:
                raise IntentError(f"--share {share!r}: the percentage must be at most 100")
            shr = (category_id(m["cat"], categories, "--share"), m["kind"], pct / 100)
        free = None
        if intent:
            parsed = recognise(intent, templates, categories)
            if parsed is None:
                free = intent
            else:
                inc, exc = inc + parsed.include, exc + parsed.exclude
                if parsed.share and shr:
                    raise IntentError("--intent and --share both ask for a proportion; give one")
                shr = shr or parsed.share
        if set(inc) & set(exc):
            raise IntentError(f"categories both included and excluded: {[categories[c] for c in set(inc) & set(exc)]}")
        return cls(categories, tuple(dict.fromkeys(inc)), tuple(dict.fromkeys(exc)), shr, free)

    def constraint(self) -> Intent:
        return Intent(self.include, self.exclude, self.share)

    def text(self, templates) -> str | None:
        """The intention as the paper's phrasings (the first of each kind), joined like Table 7's tests."""
        parts = [templates.intentions("positive")[0].format(target_category=self.categories[c]) for c in self.include]
        parts += [templates.intentions("negative")[0].format(target_category=self.categories[c]) for c in self.exclude]
        if self.share:
            c, kind, m = self.share
            parts.append(templates.proportion_intention(kind, self.categories[c], m))
        if self.free_text:
            parts.append(self.free_text)
        if not parts:
            return None
        text = parts[0]
        for part in parts[1:]:
            text = templates.combined(text, part)
        return text

    @property
    def proportion_only(self) -> bool:
        return self.share is not None and not (self.include or self.exclude or self.free_text)


def _pattern(template: str, fields: dict[str, str]) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += re.escape(template[pos:m.start()]) + fields[m[1]]
        pos = m.end()
    return re.compile(out + re.escape(template[pos:]) + r"\.?", re.IGNORECASE)


def recognise(text: str, templates, categories: list[str]) -> IntentSpec | None:
    """The intent of a free text written in the templates' phrasings (one, or two joined by ". "), or None."""
    cat = r"(?P<cat>.+?)"
    positive = [_pattern(t, {"target_category": cat}) for t in templates.intentions("positive")]
    negative = [_pattern(t, {"target_category": cat}) for t in templates.intentions("negative")]
    share = [(kind, _pattern(templates.raw["proportion_intentions"][kind],
                             {"target_category": cat, "category_proportion": r"(?P<pct>\d+(?:\.\d+)?)%"}))
             for kind in PROPORTION_KINDS]
    include, exclude, proportion = [], [], None
    for part in re.split(r"(?<=[^\d])\.\s+", text.strip()):
        found = False
        for kind, patterns in (("+", positive), ("-", negative), *((k, [p]) for k, p in share)):
            for p in patterns:
                m = p.fullmatch(part.strip())
                if m:
                    try:
                        c = category_id(m["cat"], categories, "--intent")
                    except IntentError:
                        return None
                    if kind == "+":
                        include.append(c)
                    elif kind == "-":
                        exclude.append(c)
                    elif proportion is None:
                        proportion = (c, kind, float(m["pct"]) / 100)
                    else:
                        return None
                    found = True
                    break
            if found:
                break
        if not found:
            return None
    return IntentSpec(categories, tuple(include), tuple(exclude), proportion)


def instruction(templates, history_titles: list[str], k: int, intent_text: str | None,
                proportion_only: bool = False) -> str:
    """The paper's instruction: I0 without an intention, I2's template for a proportion alone, else I1's."""
    fields = {"history": templates.titles_in_prompt(history_titles), "item_count": k}
    if not intent_text:
        return templates.prompt("seqrec", "generate", **fields)
    if proportion_only:
        return templates.prompt("proportion", "generate", proportion_intention=intent_text, **fields)
    return templates.prompt("control", "generate", synthetic_intention=intent_text, **fields)


def fit_history(render, history: list[int], budget: int) -> tuple[list[int], list[int]]:
    """(kept, dropped): the newest history items whose prompt `render(items) -> token ids` fits `budget`
    tokens, oldest dropped first. Raises IntentError when even an empty history does not fit."""
    kept = list(history)
    while len(render(kept)) > budget:
        if not kept:
            raise IntentError(f"the instruction alone takes {len(render([]))} tokens, more than the prompt budget "
                              f"of {budget} (--max-prompt-tokens)")
        kept.pop(0)
    return kept, history[:len(history) - len(kept)]
