"""Instruction samples: the SL training tasks I0-I3 (paper section 2.2), built for batches of users.

A sample is chat messages (the prompt), the response text and the metadata the RL rewards and the
evaluation metrics need (user, the history shown, target, k, controls with their categories, label).
Sample building is split in three steps so that the teacher is queried once per batch of users, never
per sample: draw a `Request` per example (task, controls, k, template form), query the teacher for the
constrained top lists of all requests at once, then turn each request and its label into text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from reclm_jax.data.schema import Dataset
from reclm_jax.core.controls import PROPORTION_KINDS, Control
from reclm_jax.tasks import labels as L
from reclm_jax.tasks.config import TaskConfig
from reclm_jax.tasks.templates import Templates, load_templates

SEQ = Control("seq")


@dataclass(frozen=True)
class Sample:
    task: str  # "seqrec", "control", "proportion", "search", "category", "sharegpt", or an eval task name
    messages: tuple[tuple[str, str], ...]  # (role, text) chat turns the response answers; the last is "user"
    response: str = ""  # the target answer without EOS ("" for RL prompts and test tasks)
    user: int = -1
    history: tuple[int, ...] = ()  # item ids shown in the prompt, oldest first
    target: int = -1  # the ground-truth next item (I3: the searched item)
    k: int = 0  # items asked for
    controls: tuple[tuple[Control, int], ...] = ()  # (control, category index); two for combined tests
    label: tuple[int, ...] = ()  # the item ids the response lists, in order

    @property
    def prompt(self) -> str:
        return self.messages[-1][1]

    @property
    def control(self) -> Control | None:
        return self.controls[0][0] if self.controls else None

    @property
    def category(self) -> int:
        """The (first) control's category; -1 without one."""
        return self.controls[0][1] if self.controls else -1


@dataclass(frozen=True)
class Example:
    """One point of a user's sequence: the shown history and the next item."""

    user: int
    history: np.ndarray  # int ids, oldest first, at most max_history
    target: int
    future: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # train items after the target


@dataclass(frozen=True)
class Request:
    """A recommendation instruction before its label is known."""

    task: str
    example: Example
    controls: tuple[tuple[Control, int], ...]
    k: int
    form: str = "generate"
    n_in: int = -1  # I2: how many label items are in C


class TaskContext:
    """What every builder reads: the dataset, the teacher, the titles as shown, templates and config."""

    def __init__(self, dataset: Dataset, teacher, cfg: TaskConfig, titles: list[str] | None = None,
                 templates: Templates | None = None):
        self.dataset = dataset
        self.teacher = teacher
        self.cfg = cfg
        self.titles = titles if titles is not None else dataset.titles
        self.templates = templates or load_templates()
        if len(self.titles) != dataset.num_items:
            raise ValueError(f"{len(self.titles)} titles for {dataset.num_items} items")

    @cached_property
    def cats(self) -> np.ndarray:
        return self.dataset.category_matrix

    @cached_property
    def members(self) -> list[np.ndarray]:
        return [np.flatnonzero(col) for col in self.cats.T]

    @cached_property
    def category_sizes(self) -> np.ndarray:
        return self.cats.sum(0)

    def available(self, history) -> np.ndarray:
        """int [num_categories]: items of each category not in `history`."""
        return self.category_sizes - self.cats[np.asarray(history, dtype=np.int64)].sum(0)

    def top(self, histories: Sequence[np.ndarray], k: int, include=None, exclude=None) -> np.ndarray:
        """The teacher's top-k per history, queried in chunks of cfg.teacher_batch users."""
        if self.teacher is None:
            raise ValueError("these samples need the teacher (label augmentation / the -C category)")
        step = self.cfg.teacher_batch
        parts = []
        for s in range(0, len(histories), step):
            sl = slice(s, s + step)
            parts.append(self.teacher.topk(
                [np.asarray(h) for h in histories[sl]], k,
                include=None if include is None else include[sl],
                exclude=None if exclude is None else exclude[sl]))
        return np.concatenate(parts) if parts else np.zeros((0, k), np.int32)


# ---- examples ---------------------------------------------------------------------------------------
def train_examples(dataset: Dataset, max_history: int, rng: np.random.Generator) -> list[Example]:
    """One example per user from the train part (the reference): target index t uniform in [1, len-1],
    history start uniform in [max(0, t - max_history), t - 1]. Users with under 2 train items are skipped."""
    out = []
    for u in range(dataset.num_users):
        seq = dataset.train_sequence(u)
        if len(seq) < 2:
            continue
        t = int(rng.integers(1, len(seq)))
        start = int(rng.integers(max(0, t - max_history), t))
        out.append(Example(u, seq[start:t], int(seq[t]), seq[t + 1:]))
    return out


def split_example(dataset: Dataset, user: int, split: str, max_history: int) -> Example:
    """The valid or test example of a user: the target and the max_history items before it."""
    history, target = dataset.valid_example(user) if split == "valid" else dataset.test_example(user)
    return Example(user, history[-max_history:], target)


# ---- requests ---------------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _k_up_to(rng, k_range: tuple[int, int], cap: int) -> int | None:
    lo, hi = k_range
    hi = min(hi, cap)
    return int(rng.integers(lo, hi + 1)) if hi >= lo else None


def random_category(ctx: TaskContext, ex: Example, rng, min_available: int) -> int | None:
    """A category drawn uniformly among those with at least `min_available` items outside the history
    (the reference draws the +C category among all categories)."""
    ok = np.flatnonzero(ctx.available(ex.history) >= min_available)
    return int(rng.choice(ok)) if len(ok) else None


def training_request(ctx: TaskContext, task: str, kind: str, ex: Example, top: np.ndarray, rng,
                     k_range: tuple[int, int], forms: tuple[str, ...]) -> Request | None:
    """Draw the instruction of one training/RL example (None when the data cannot support it).

    +C: C uniform among categories (with enough items); -C and <=: the most frequent category of the
    teacher's top-10 that the target is not in; >= and ~: like +C. k uniform in k_range, capped by the
    items available; I2's m uniform over cfg.proportions and its in-C count n uniform among the counts
    that satisfy the instruction (so the stated percentage and the label always agree).
    """
    n_items, hist = ctx.dataset.num_items, ex.history
    form = _pick(rng, forms)
    if kind == "seq":
        k = _k_up_to(rng, k_range, n_items - len(hist))
        return None if k is None else Request(task, ex, ((SEQ, -1),), k, form)
    if kind in ("-c", "<="):
        c = L.negative_category(top[:10], ex.target, ctx.cats, rng)
    else:
        c = random_category(ctx, ex, rng, k_range[0] if kind == "+c" else 0)
    if c is None:
        return None
    avail_in = int(ctx.available(hist)[c])
    avail_out = n_items - len(set(hist.tolist())) - avail_in
    if kind in ("+c", "-c"):
        k = _k_up_to(rng, k_range, avail_in if kind == "+c" else avail_out)
        return None if k is None else Request(task, ex, ((Control(kind), c),), k, form)
    m = float(_pick(rng, ctx.cfg.proportions))
    lo, hi = k_range
    for k in rng.permutation(np.arange(lo, hi + 1)):
        k = int(k)
        n = L.proportion_count(kind, k, m, max(0, k - avail_out), min(k, avail_in), rng)
        if n is not None:
            return Request(task, ex, ((Control(kind, m), c),), k, form, n_in=n)
    return None


# ---- labels -----------------------------------------------------------------------------------------
def _masks(ctx: TaskContext, reqs: list[Request]) -> np.ndarray:
    return ctx.cats[:, [r.controls[0][1] for r in reqs]].T


def teacher_labels(ctx: TaskContext, reqs: list[Request], top: np.ndarray, rng) -> list[list[int]]:
    """Labels of requests (paper section 2.2.2), with one constrained teacher query per side for all."""
    width = ctx.cfg.max_k + 1  # +1: the target may sit in the teacher's list and is removed from it
    kinds = [r.controls[0][0].kind for r in reqs]
    need_in = [i for i, kd in enumerate(kinds) if kd == "+c" or kd in PROPORTION_KINDS]
    need_out = [i for i, kd in enumerate(kinds) if kd == "-c" or kd in PROPORTION_KINDS]
    wide = max([width] + [r.k + 1 for r in reqs])
    top_in, top_out = {}, {}
    for need, store, arg in ((need_in, top_in, "include"), (need_out, top_out, "exclude")):
        if need:
            sub = [reqs[i] for i in need]
            lists = ctx.top([r.example.history for r in sub], wide, **{arg: _masks(ctx, sub)})
            store.update(zip(need, lists))
    out = []
    for i, r in enumerate(reqs):
        ex, kind = r.example, kinds[i]
        c = r.controls[0][1]
        if kind == "seq":
            out.append(L.seqrec_label(ex.target, top[i], r.k, ex.history))
        elif kind in ("+c", "-c"):
            ok = bool(ctx.cats[ex.target, c]) == (kind == "+c")
            out.append(L.control_label(ex.target, ok, top_in[i] if kind == "+c" else top_out[i], r.k, ex.history))
        else:
            out.append(L.proportion_label(ex.target, bool(ctx.cats[ex.target, c]), top_in[i], top_out[i],
                                          r.n_in, r.k, ex.history, rng))
    return out


def history_label(ex: Example, k: int) -> list[int]:
    """PALR-style label: the user's true next items (the target and the train items after it)."""
    return L.fill([ex.target], ex.future, k, ex.history)


# ---- rendering --------------------------------------------------------------------------------------
def intention(ctx: TaskContext, control: Control, category: int, rng) -> str:
    """One phrasing of a control's intention (Listings 3, 5 and 6)."""
    name = ctx.dataset.categories[category]
    if control.kind in PROPORTION_KINDS:
        return ctx.templates.proportion_intention(control.kind, name, control.m)
    polarity = "positive" if control.kind == "+c" else "negative"
    return _pick(rng, ctx.templates.intentions(polarity)).format(target_category=name)


def render(ctx: TaskContext, req: Request, label: Sequence[int] | None, rng) -> Sample:
    """The prompt text of a request (a label is needed for the select form) and the response."""
    tpl, ex = ctx.templates, req.example
    fields = {"history": tpl.titles_in_prompt([ctx.titles[i] for i in ex.history]), "item_count": req.k}
    if req.form == "select":
        if label is None:
            raise ValueError("the select-from-candidates form needs the label")
        cands = L.candidates(list(label), ctx.dataset.num_items, ctx.cfg.num_candidates, ex.history, rng)
        fields["candidate_titles"] = tpl.titles_in_prompt([ctx.titles[i] for i in cands])
    (first, c1), *rest = req.controls
    if first.kind == "seq":
        group = "seqrec"
    elif first.kind in PROPORTION_KINDS and not rest:
        group = "proportion"
        fields["proportion_intention"] = intention(ctx, first, c1, rng)
    else:
        group = "control"
        text = intention(ctx, first, c1, rng)
        for control, c in rest:
            text = tpl.combined(text, intention(ctx, control, c, rng))
        fields["synthetic_intention"] = text
    prompt = tpl.prompt(group, req.form, **fields)
    return Sample(
        task=req.task,
        messages=(("user", prompt),),
        response=tpl.response([ctx.titles[i] for i in label]) if label is not None else "",
        user=ex.user,
        history=tuple(int(i) for i in ex.history),
        target=ex.target,
        k=req.k,
        controls=req.controls,
        label=tuple(label) if label is not None else (),
    )


def _training_forms(ctx: TaskContext, group: str) -> tuple[str, ...]:
    """The template forms of a task's training samples (tasks name their template groups)."""
    forms = ctx.templates.forms(group)
    return forms if ctx.cfg.select_form else tuple(f for f in forms if f != "select")


# ---- the training tasks -----------------------------------------------------------------------------
TRAIN_KINDS = {"seqrec": ("seq",), "control": ("+c", "-c"), "proportion": ("<=", ">=", "~")}


def recommendation_samples(ctx: TaskContext, task: str, examples: list[Example], rng, *,
                           k_range: tuple[int, int] | None = None, forms: tuple[str, ...] | None = None,
                           with_labels: bool = True, kinds: tuple[str, ...] | None = None) -> list[Sample]:
    """Samples of I0 ("seqrec"), I1 ("control") or I2 ("proportion") for `examples`, one each (fewer when
    the data cannot support a request). Each control kind of the task (or of `kinds`) and each template
    form (default: the task's training forms with labels, "generate" without) is equally likely."""
    kinds = kinds or TRAIN_KINDS[task]
    k_range = k_range or (ctx.cfg.min_k, ctx.cfg.max_k)
    forms = forms or (_training_forms(ctx, task) if with_labels else ("generate",))
    palr = ctx.cfg.labels == "history" and with_labels
    need_top = not palr or any(kd in ("-c", "<=") for kd in kinds)
    top = ctx.top([e.history for e in examples], ctx.cfg.max_k + 1) if need_top else None
    reqs, tops = [], []
    for i, ex in enumerate(examples):
        kind = _pick(rng, kinds)
        row = top[i] if top is not None else np.zeros(0, np.int64)
        if palr:  # the true next items bound k
            k_cap = (k_range[0], min(k_range[1], 1 + len(ex.future)))
            req = training_request(ctx, task, kind, ex, row, rng, k_cap, forms) if k_cap[1] >= k_cap[0] else None
        else:
            req = training_request(ctx, task, kind, ex, row, rng, k_range, forms)
        if req is not None:
            reqs.append(req)
            tops.append(row)
    if not with_labels:
        return [render(ctx, r, None, rng) for r in reqs]
    if palr:
        labels = [history_label(r.example, r.k) for r in reqs]
    else:
        labels = teacher_labels(ctx, reqs, np.asarray(tops), rng)
    return [render(ctx, r, lab, rng) for r, lab in zip(reqs, labels)]


def search_samples(ctx: TaskContext, items: Sequence[int], rng) -> list[Sample]:
    """I3 item search, one sample per item: the generate or select form asks for k items of one of the
    item's categories C (label: the item, then random other items of C); the reverse form asks for the
    item's categories. Each form (the select form only with cfg.select_form) is equally likely. Items
    without a category are skipped."""
    tpl, out = ctx.templates, []
    forms = _training_forms(ctx, "search") + ("category",)
    for item in items:
        item = int(item)
        own = np.flatnonzero(ctx.cats[item])
        if not len(own):
            continue
        form = _pick(rng, forms)
        if form == "category":
            names = [ctx.dataset.categories[c] for c in own]
            out.append(Sample("category", (("user", tpl.category_question(ctx.titles[item])),),
                              tpl.response(names), target=item, k=len(names)))
            continue
        c = int(rng.choice(own))
        k = int(rng.integers(1, min(ctx.cfg.search_max_k, len(ctx.members[c])) + 1))
        label = L.search_label(item, ctx.members[c], k, rng)
        fields = {"item_count": k, "synthetic_intention": intention(ctx, Control("+c"), c, rng)}
        if form == "select":
            cands = L.candidates(label, ctx.dataset.num_items, ctx.cfg.num_candidates, (), rng)
            fields["candidate_titles"] = tpl.titles_in_prompt([ctx.titles[i] for i in cands])
        out.append(Sample("search", (("user", tpl.prompt("search", form, **fields)),),
                          tpl.response([ctx.titles[i] for i in label]), target=item, k=k,
                          controls=((Control("+c"), c),), label=tuple(label)))
    return out
