import pytest

from models.text import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocab, detokenize, tokenize


def test_tokenize_splits_words_and_punctuation_and_lowercases():
    assert tokenize("Don't stop, NOW!") == ["don't", "stop", ",", "now", "!"]
    assert tokenize("¿Dónde está?") == ["¿", "dónde", "está", "?"]
    assert tokenize("   ") == []


@pytest.mark.parametrize(
    "text",
    ["in the beginning, god created the heavens.", "¿hasta cuándo, oh jehová?", "it's a (quiet) film: 90% good!"],
)
def test_detokenize_round_trips_normalised_text(text):
    assert detokenize(tokenize(text)) == text


def test_vocab_is_deterministic_and_starts_with_specials():
    texts = ["b a a", "c b a", "d"]
    v1, v2 = Vocab.build(texts, max_size=10), Vocab.build(list(reversed(texts)), max_size=10)
    assert v1.itos == v2.itos
    assert tuple(v1.itos[:4]) == SPECIALS
    assert v1.itos[4:] == ["a", "b", "c", "d"]  # by count, ties by token
    assert Vocab.build(texts, max_size=6).itos[4:] == ["a", "b"]
    assert Vocab.build(texts, max_size=10, min_freq=2).itos[4:] == ["a", "b"]


def test_encode_decode_round_trip_with_unknowns_and_specials():
    v = Vocab.build(["the cat sat", "the dog"], max_size=100)
    ids = v.encode("The cat flew", bos_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and UNK_ID in ids
    assert v.decode(ids) == "the cat <unk>"
    assert v.decode([v.stoi["dog"], EOS_ID, v.stoi["cat"]]) == "dog"  # stops at <eos>
    assert v.decode([PAD_ID, v.stoi["cat"], PAD_ID]) == "cat"
    assert len(v.encode("the cat sat the dog", max_len=4, bos_eos=True)) == 4


def test_vocab_rejects_a_list_without_the_specials():
    with pytest.raises(ValueError, match="must start with"):
        Vocab(["a", "b", "c", "d"])
