"""CLIP token positions of caption phrases: the `tokens` field of a record's objects.

Positions index open_clip's tokenization of the whole caption (the CLIP BPE that Stable Diffusion 2's
OpenCLIP text encoder uses): position 0 is the start-of-text token, so the caption's first BPE token is
at 1. A word the BPE splits yields several positions. Positions at or past `CONTEXT_LENGTH - 1` fall
off the end when open_clip truncates to 77 tokens; `in_context` tells whether all of them survive.
"""

from __future__ import annotations

from functools import lru_cache

CONTEXT_LENGTH = 77


@lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's SimpleTokenizer (the BPE vocabulary ships inside open_clip: works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_positions(caption: str, span: tuple[int, int] | list[int]) -> list[int]:
    """Positions of caption[start:end]'s BPE tokens in the tokenization of `caption` (start token at 0).

    The span must start and end on word boundaries (as noun spans do). Raises ValueError when it does
    not, i.e. when the phrase's own tokens are not a run of the caption's tokens.
    """
    start, end = int(span[0]), int(span[1])
    if not (0 <= start < end <= len(caption)):
        raise ValueError(f"span {[start, end]} is outside the caption (length {len(caption)})")
    tok = clip_tokenizer()
    full = tok.encode(caption)
    prefix = tok.encode(caption[:start])
    phrase = tok.encode(caption[start:end])
    n0 = len(prefix)
    if not phrase or full[n0 : n0 + len(phrase)] != phrase:
        raise ValueError(
            f"caption[{start}:{end}] = {caption[start:end]!r} does not tokenize as a run of the caption's "
            "tokens; spans must start and end on word boundaries"
        )
    return [1 + n0 + j for j in range(len(phrase))]


def in_context(positions: list[int], context_length: int = CONTEXT_LENGTH) -> bool:
    """True when every position survives open_clip's truncation (the last slot becomes end-of-text)."""
    return all(p < context_length - 1 for p in positions)
