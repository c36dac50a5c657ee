"""FaceChain's trigger word and training captions (Liu et al. 2023, "Tagging"; METHODS.md section 5).

FaceChain tags each prepared photo with DeepDanbooru and FairFace (gender: Male/Female; age: nine bins 0-2,
3-9, 10-19, 20-29, 30-39, 40-49, 50-59, 60-69, 70+), sums the FairFace scores over all photos and picks one
trigger word for the person (modelscope/facechain ``facechain/data_process/preprocessing.py``,
``post_process_naive``):

    age bin < 2  (under 10)  -> 'a boy' / 'a girl', plus the tag 'children'
    age bin > 4  (40 and up) -> 'a mature man' / 'a mature woman'
    otherwise    (10 to 39)  -> 'a handsome man' / 'a beautiful woman'

and writes each caption as ``'<sks>, ' + trigger + tags`` (metadata.jsonl). Here gender and age come from an
insightface genderage model (``py/faces/genderage.py``): p_male / p_female are summed over the photos as
FaceChain sums its gender scores, and each photo's age counts as one vote for its FairFace bin (the model
gives a number, not bin scores); the bin with most votes wins, ties going to the younger bin (argmax).
No DeepDanbooru tags: captions are the token and the trigger word only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# FaceChain's order (cnts_trigger / trigger_styles in preprocessing.py): index = 2 * age class + gender.
TRIGGER_WORDS = ("a boy", "a girl", "a handsome man", "a beautiful woman", "a mature man", "a mature woman")
AGE_BIN_STARTS = (0, 3, 10, 20, 30, 40, 50, 60, 70)  # FairFace: 0-2, 3-9, ..., 60-69, 70+
CHILD_BINS_BELOW = 2  # bins 0, 1: under 10
MATURE_BINS_ABOVE = 4  # bins 5..8: 40 and older


def age_bin(age: float) -> int:
    """FairFace age bin (0..8) of an age in years."""
    return int(np.searchsorted(AGE_BIN_STARTS, age, side="right") - 1) if age >= 0 else 0


def trigger_index(male: bool, bin_: int) -> int:
    """Index into TRIGGER_WORDS for a gender and a FairFace age bin (FaceChain's post_process_naive)."""
    age_class = 0 if bin_ < CHILD_BINS_BELOW else 2 if bin_ > MATURE_BINS_ABOVE else 1
    return 2 * age_class + (0 if male else 1)


def trigger_word(p_female: Sequence[float], p_male: Sequence[float], ages: Sequence[float]) -> str:
    """One trigger word for a set of photos of one person (see module doc for the vote)."""
    if not (len(p_female) == len(p_male) == len(ages)) or not ages:
        raise ValueError("trigger_word: give one p_female, p_male and age per photo (at least one photo)")
    male = float(np.sum(p_male)) >= float(np.sum(p_female))  # argmax([Male, Female]): a tie is Male, as there
    votes = np.bincount([age_bin(a) for a in ages], minlength=len(AGE_BIN_STARTS))
    return TRIGGER_WORDS[trigger_index(male, int(np.argmax(votes)))]


def caption(token: str, word: str) -> str:
    """One training caption: FaceChain's ``'<sks>, ' + trigger`` (children also get the tag 'children')."""
    if word not in TRIGGER_WORDS:
        raise ValueError(f"caption: {word!r} is not one of FaceChain's trigger words {TRIGGER_WORDS}")
    parts = [token.strip()] if token.strip() else []
    parts.append(word)
    if word in TRIGGER_WORDS[:2]:
        parts.append("children")
    return ", ".join(parts)


def training_steps(images: int, epochs: int, batch_size: int = 1) -> int:
    """Optimizer steps for ``epochs`` passes over ``images`` photos at ``batch_size`` (ceil(N * epochs / B))."""
    if images < 1 or epochs < 1 or batch_size < 1:
        raise ValueError("training_steps: images, epochs and batch_size must be >= 1")
    return -(-images * epochs // batch_size)
