"""FaceChain's trigger words and captions (py/facechain/tagging.py), by hand from preprocessing.py's rule."""

import pytest

from facecond.py.facechain import tagging


def test_the_six_trigger_words_in_facechains_order():
    assert tagging.TRIGGER_WORDS == ("a boy", "a girl", "a handsome man", "a beautiful woman", "a mature man",
                                     "a mature woman")


@pytest.mark.parametrize("age,bin_", [(0, 0), (2, 0), (3, 1), (9, 1), (10, 2), (19, 2), (20, 3), (39, 4), (40, 5),
                                      (49, 5), (50, 6), (69, 7), (70, 8), (104, 8), (-1, 0)])
def test_fairface_age_bins(age, bin_):
    assert tagging.age_bin(age) == bin_


@pytest.mark.parametrize("male,age,word", [
    (True, 9, "a boy"), (False, 9, "a girl"), (True, 10, "a handsome man"), (False, 10, "a beautiful woman"),
    (True, 39, "a handsome man"), (False, 39, "a beautiful woman"), (True, 40, "a mature man"),
    (False, 71, "a mature woman"), (True, 0, "a boy")])
def test_one_photo_maps_to_the_word(male, age, word):
    pf, pm = (0.1, 0.9) if male else (0.9, 0.1)
    assert tagging.trigger_word([pf], [pm], [age]) == word


def test_a_set_of_photos_votes():
    # p_male sums 0.6 + 0.3 + 0.7 = 1.6 > p_female 1.4: male. Ages 35, 42, 47: bins 4, 5, 5 -> bin 5 (40-49)
    assert tagging.trigger_word([0.4, 0.7, 0.3], [0.6, 0.3, 0.7], [35, 42, 47]) == "a mature man"
    # a tie in the age votes (bins 4 and 5) goes to the younger bin; a gender tie to male (FairFace argmax)
    assert tagging.trigger_word([0.5, 0.5], [0.5, 0.5], [35, 45]) == "a handsome man"
    assert tagging.trigger_word([0.9, 0.2, 0.8], [0.1, 0.8, 0.2], [8, 30, 5]) == "a girl"
    with pytest.raises(ValueError, match="one p_female"):
        tagging.trigger_word([], [], [])


def test_captions_and_steps():
    assert tagging.caption("sks", "a handsome man") == "sks, a handsome man"
    assert tagging.caption("<sks>", "a girl") == "<sks>, a girl, children"
    assert tagging.caption("  ", "a mature woman") == "a mature woman"
    with pytest.raises(ValueError, match="trigger words"):
        tagging.caption("sks", "a man")
    # FaceChain trains 20 epochs: 2 photos at batch 1 -> 40 steps; 5 photos at batch 2 -> ceil(100 / 2) = 50
    assert tagging.training_steps(2, 20) == 40
    assert tagging.training_steps(5, 20, 2) == 50 and tagging.training_steps(3, 1, 2) == 2
