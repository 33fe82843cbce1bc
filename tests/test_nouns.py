"""Nouns stage on fixed real captions: exact nouns, lemmas, character spans and CLIP token positions.

Expected token positions were read off open_clip's BPE of each caption (start token at 0), e.g.
"a rocket on a launchpad" -> a(1) rocket(2) on(3) a(4) launch(5) pad(6): "launchpad" is [5, 6].
"""

from __future__ import annotations

import pytest

from subjectdiff.datagen.config import NounsConfig
from subjectdiff.datagen.stages.nouns import NounExtractor


@pytest.fixture(scope="module")
def nouns():
    return NounExtractor(NounsConfig())


def triples(found):
    return [(n["label"], n["phrase"], n["span"], n["tokens"]) for n in found]


def test_single_token_nouns(nouns):
    cap = "an astronaut in a white suit holding a helmet near a flag"
    assert triples(nouns.extract(cap)) == [
        ("astronaut", "astronaut", [3, 12], [2]),
        ("suit", "suit", [24, 28], [6]),
        ("helmet", "helmet", [39, 45], [9]),
        ("flag", "flag", [53, 57], [12]),
    ]


def test_multi_token_words_and_lemmas(nouns):
    # hippo|potam|uses, motor|boat, windo|ws|ill, succul|ents: one noun, several CLIP positions.
    assert triples(nouns.extract("two hippopotamuses swimming next to a motorboat, view from the top")) == [
        ("hippopotamus", "hippopotamuses", [4, 18], [2, 3, 4]),
        ("motorboat", "motorboat", [38, 47], [9, 10]),
    ]
    assert triples(nouns.extract("the cat sat on the windowsill beside potted succulents")) == [
        ("cat", "cat", [4, 7], [2]),
        ("windowsill", "windowsill", [19, 29], [6, 7, 8]),
        ("succulent", "succulents", [44, 54], [11, 12]),
    ]
    assert triples(nouns.extract("a rocket on a launchpad under the sky")) == [
        ("rocket", "rocket", [2, 8], [2]),
        ("launchpad", "launchpad", [14, 23], [5, 6]),
        ("sky", "sky", [34, 37], [9]),
    ]


def test_stop_list_drops_non_objects(nouns):
    # "view", "top", "front" and "background" are nouns but name no object to box.
    found = nouns.extract("a close up of a dog's face in front of a background")
    assert [n["label"] for n in found] == ["dog", "face"]
    assert all(n["label"] not in ("view", "top") for n in nouns.extract("a view from the top of a tower"))


def test_compound_is_one_noun_with_a_phrase_spanning_it(nouns):
    # a(1) coffee(2) cup(3) on(4) a(5) table(6): "coffee" modifies "cup", so one noun, labelled by its head,
    # whose phrase (the grounding prompt's words) and CLIP tokens cover the whole compound.
    assert triples(nouns.extract("a coffee cup on a table")) == [
        ("cup", "coffee cup", [2, 12], [2, 3]),
        ("table", "table", [18, 23], [6]),
    ]
    # "light" alone is on the stop list; as a compound's head it names a thing
    assert triples(nouns.extract("a traffic light above a road")) == [
        ("light", "traffic light", [2, 15], [2, 3]),
        ("road", "road", [24, 28], [6]),
    ]
    # three words, and a hyphenated compound spaCy splits in three: t(5) -(6) shirt(7)
    assert triples(nouns.extract("a man wearing a t-shirt next to a coffee shop sign")) == [
        ("man", "man", [2, 5], [2]),
        ("shirt", "t-shirt", [16, 23], [5, 6, 7]),
        ("sign", "coffee shop sign", [34, 50], [11, 12, 13]),
    ]
    # a compound of stop nouns only still names no object
    assert [n["phrase"] for n in nouns.extract("a stock photo of a dog")] == ["dog"]
    # `unique` compares whole compounds: two kinds of cup are two nouns
    assert [n["phrase"] for n in nouns.extract("a coffee cup and a tea cup on a table")] == [
        "coffee cup",
        "tea cup",
        "table",
    ]


def test_repeated_noun_kept_once_unless_configured(nouns):
    cap = "a dog and another dog"
    assert [n["span"] for n in nouns.extract(cap)] == [[2, 5]]
    both = NounExtractor(NounsConfig(unique=False)).extract(cap)
    assert [n["span"] for n in both] == [[2, 5], [18, 21]]


def test_noun_chunk_mode():
    chunks = NounExtractor(NounsConfig(mode="chunks"))
    assert triples(chunks.extract("an astronaut in a white suit holding a helmet near a flag")) == [
        ("astronaut", "astronaut", [3, 12], [2]),
        ("suit", "white suit", [18, 28], [5, 6]),
        ("helmet", "helmet", [39, 45], [9]),
        ("flag", "flag", [53, 57], [12]),
    ]
    # leading determiners and numbers leave the phrase; the lemma is the chunk's root
    assert triples(chunks.extract("two hippopotamuses swimming")) == [
        ("hippopotamus", "hippopotamuses", [4, 18], [2, 3, 4])
    ]
    # the stop list treats a chunk's compound as nouns mode does
    assert triples(chunks.extract("a red traffic light in a stock photo")) == [
        ("light", "red traffic light", [2, 19], [2, 3, 4])
    ]


def test_no_nouns_is_a_failure_not_an_exception(nouns):
    items = [
        {"key": "k", "source": "s", "caption": "in front of the background"},
        {"key": "k2", "source": "s2", "caption": ""},
        {"key": "k3", "source": "s3", "failure": {"stage": "decode", "reason": "x"}},
    ]
    out = nouns(items)
    assert out[0]["failure"] == {"stage": "nouns", "reason": "no nouns in the caption"}
    assert out[1]["failure"]["stage"] == "nouns"
    assert out[2]["failure"] == {"stage": "decode", "reason": "x"} and "nouns" not in out[2]


def test_config_checks():
    with pytest.raises(ValueError, match="nouns.mode"):
        NounsConfig(mode="verbs")


def test_caption_noun_count_window_of_the_reference_recipe():
    """data_process.py keeps captions with 3-8 spaCy nouns (repeats and compound parts counted)."""
    window = NounExtractor(NounsConfig(min_caption_nouns=3, max_caption_nouns=8))
    items = [
        {"key": "a", "source": "a", "caption": "a cat on a rug"},  # 2 nouns
        {"key": "b", "source": "b", "caption": "a cat on a rug near a coffee cup"},  # 4: coffee, cup too
        {"key": "c", "source": "c", "caption": "a dog " + "and a dog " * 8},
    ]  # 9 (repeats count)
    out = window(items)
    assert "outside [3, 8]" in out[0]["failure"]["reason"] and out[0]["failure"]["stage"] == "nouns"
    assert "failure" not in out[1] and [n["label"] for n in out[1]["nouns"]] == ["cat", "rug", "cup"]
    assert "9 nouns" in out[2]["failure"]["reason"]
    with pytest.raises(ValueError, match="min_caption_nouns"):
        NounsConfig(min_caption_nouns=5, max_caption_nouns=3)


def test_count_words_move_spans_and_tokens(nouns):
    """A noun detected 2-6 times gets its count word ("two dogs"), and every noun's span and CLIP tokens follow."""
    from subjectdiff.catalogs.tokens import clip_token_positions
    from subjectdiff.datagen.stages.nouns import with_count_words

    cap = "a dog chasing the ducks beside a fountain"
    found = nouns.extract(cap)
    assert [n["label"] for n in found] == ["dog", "duck", "fountain"]
    new, moved = with_count_words(cap, found, {0: 2, 1: 3, 2: 1})
    assert new == "two dog chasing the three ducks beside a fountain"
    for n in moved:
        assert new[n["span"][0] : n["span"][1]] == n["phrase"] and n["tokens"] == clip_token_positions(new, n["span"])
    assert with_count_words(cap, found, {0: 7, 2: 1}) == (cap, found)  # 7 or more, or 1: unchanged
    assert with_count_words("two dogs", nouns.extract("two dogs"), {0: 2})[0] == "two dogs"  # already counted
