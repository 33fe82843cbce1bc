"""Prompts with subject placeholders, and their CLIP token ids and positions (pure Python, no torch).

The paper's template (Method, text-image semantic fusion) appends ", the {label} is {placeholder}" to the
caption for each subject; the placeholder's input embedding is later replaced by the subject image's CLS
embedding through an MLP.
Token positions index open_clip's tokenization (start-of-text at 0), the convention of the records'
`tokens`: a word the BPE splits has several positions, so nothing here assumes one token per word.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from subjectdiff.catalogs.tokens import CONTEXT_LENGTH, clip_token_positions, clip_tokenizer

SOT, EOT, PAD = 49406, 49407, 0  # open_clip pads with 0, as SD 2's tokenizer ("!" = 0) does


@dataclass
class SubjectPrompt:
    """prompt: the caption with one ", the {label} is {placeholder}" clause per subject.
    placeholder_pos: per subject, the token position of its placeholder, or -1 when it fell past the context.
    label_pos: per subject, the positions of the label's tokens in the appended clause.
    """

    prompt: str
    placeholder_pos: list[int]
    label_pos: list[list[int]]


def check_placeholder(placeholder: str) -> None:
    if len(clip_tokenizer().encode(placeholder)) != 1:
        raise ValueError(
            f"placeholder {placeholder!r} must be one CLIP BPE token, a word such as 'sks' "
            "(punctuation like '*' merges with the comma that follows it)"
        )


def subject_prompt(caption: str, labels: list[str], placeholder: str = "sks") -> SubjectPrompt:
    """Append the subject clauses to `caption`. Positions of the caption's own tokens are unchanged."""
    sp = _subject_prompt(caption, tuple(labels), placeholder)
    return SubjectPrompt(sp.prompt, list(sp.placeholder_pos), [list(p) for p in sp.label_pos])


@lru_cache(maxsize=8192)  # BPE is the data loader's hot spot; records repeat every epoch
def _subject_prompt(caption: str, labels: tuple[str, ...], placeholder: str) -> SubjectPrompt:
    prompt = caption.rstrip()
    ph_spans, label_spans = [], []
    for label in labels:
        clause = f", the {label} is "
        label_spans.append([len(prompt) + 6, len(prompt) + 6 + len(label)])
        prompt += clause
        ph_spans.append([len(prompt), len(prompt) + len(placeholder)])
        prompt += placeholder
    ph_pos, label_pos = [], []
    for ph, lab in zip(ph_spans, label_spans):
        p = clip_token_positions(prompt, ph)
        if len(p) != 1:
            raise ValueError(f"placeholder {placeholder!r} tokenizes to {len(p)} tokens in {prompt!r}; use one token")
        ph_pos.append(p[0] if p[0] < CONTEXT_LENGTH - 1 else -1)
        label_pos.append([q for q in clip_token_positions(prompt, lab) if q < CONTEXT_LENGTH - 1])
    return SubjectPrompt(prompt, ph_pos, label_pos)


def tokenize(text: str, context_length: int = CONTEXT_LENGTH) -> list[int]:
    """open_clip's tokenization: [SOT, bpe..., EOT, PAD...], truncated to context_length (EOT kept last)."""
    return list(_tokenize(text, context_length))


@lru_cache(maxsize=8192)
def _tokenize(text: str, context_length: int) -> tuple[int, ...]:
    ids = clip_tokenizer().encode(text)[: context_length - 2]
    ids = [SOT, *ids, EOT]
    return tuple(ids + [PAD] * (context_length - len(ids)))
