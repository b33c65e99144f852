import pytest

from models.text import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, SubwordTokenizer, Vocab, detokenize, tokenize


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


CORPUS = [
    "In the beginning God created the heavens and the earth.",
    "En el principio crió Dios los cielos y la tierra.",
    "And God said, Let there be light: and there was light.",
    "Y dijo Dios: Sea la luz: y fué la luz.",
] * 20


@pytest.fixture(scope="module")
def subwords() -> SubwordTokenizer:
    return SubwordTokenizer.train(CORPUS, vocab_size=120)


def test_subword_model_is_deterministic_and_keeps_the_shared_special_ids(subwords):
    assert SubwordTokenizer.train(CORPUS, vocab_size=120).model == subwords.model
    assert [subwords.piece(i) for i in range(4)] == list(SPECIALS)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


def test_subwords_round_trip_text_and_split_unseen_words_instead_of_unk(subwords):
    for text in ("Y dijo Dios: Sea la luz.", "Let there be light"):
        ids = subwords.encode(text, bos_eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert subwords.decode(ids) == text
    unseen = subwords.encode("created heavens, dijo tierra.")  # new combinations of known characters
    assert UNK_ID not in unseen and subwords.decode(unseen) == "created heavens, dijo tierra."
    assert subwords.decode([*subwords.encode("la luz"), EOS_ID, *subwords.encode("Dios")]) == "la luz"
    assert len(subwords.encode("Y dijo Dios: Sea la luz.", max_len=4, bos_eos=True)) == 4
    assert len(subwords.encode("la luz")) == len(subwords.pieces("la luz")) > 0


def test_a_subword_model_survives_the_checkpoint_as_bytes(tmp_path, subwords):
    import torch

    torch.save({"tokenizer": subwords.model}, tmp_path / "t.pt")
    again = SubwordTokenizer(torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"])
    assert again.encode("Sea la luz.") == subwords.encode("Sea la luz.")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        SubwordTokenizer(b"not a sentencepiece model")
