"""Handlers in-process, through TorchServe's own Context: parity with the model, batching, bad input."""

import base64
import io
import json
import logging
import time
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from handlers import checkpoint
from models.image import normalize
from models.text import SubwordTokenizer, Vocab, pad_batch
from scripts.registry import load_dataset
from tests.helpers import load_handler, png, run_batch

TOL = dict(rtol=0, atol=1e-5)  # probabilities are rounded to 6 decimals in the answers


def direct_model(path):
    ckpt = checkpoint.load(path)
    return checkpoint.rebuild(ckpt), ckpt


@pytest.fixture(scope="module")
def handlers(tiny_checkpoints):
    return {m: load_handler(m, p) for m, p in tiny_checkpoints.items()}


@pytest.fixture(scope="module")
def digits():
    ds = load_dataset("cnn")
    x, y = ds.take("test")
    return x[:6], y[:6]


# ----------------------------------------------------------------------------- parity


def test_image_handler_matches_the_model_on_real_digits_in_every_input_format(handlers, tiny_checkpoints, digits):
    handler, ctx = handlers["cnn"]
    model, ckpt = direct_model(tiny_checkpoints["cnn"])
    x, _ = digits
    pre = ckpt["preprocess"]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(normalize(x, pre["mean"], pre["std"]))), -1)
    raw = [png(img) for img in x]
    requests = [
        {"body": raw[0]},  # raw PNG body
        {"data": raw[1]},  # multipart field
        {"body": base64.b64encode(raw[2]).decode()},  # base64 text
        {"body": {"data": base64.b64encode(raw[3]).decode(), "topk": 10}},  # JSON
        {"body": json.dumps({"data": base64.b64encode(raw[4]).decode()}).encode()},  # JSON as bytes (gRPC)
        {"body": png(x[5], "RGB")},  # colour image
    ]
    answers, statuses, headers = run_batch(handler, ctx, requests)
    assert [s for s, _ in statuses] == [200] * 6
    assert all(h["X-Batch-Size"] == "6" and h["X-Model-Version"] == "1.0" for h in headers)
    for i, answer in enumerate(answers):
        assert len(answer) == (10 if i == 3 else 3)
        for label, p in answer.items():
            torch.testing.assert_close(p, expected[i, ckpt["labels"].index(label)].item(), **TOL)
        assert list(answer) == [ckpt["labels"][j] for j in expected[i].argsort(descending=True)[: len(answer)]]


def test_image_handler_resizes_and_inverts_drawings(handlers, digits):
    handler, ctx = handlers["cnn"]
    x, _ = digits
    light = np.array(Image.fromarray(255 - x[0]).resize((112, 112), Image.Resampling.NEAREST))
    a, _, _ = run_batch(handler, ctx, [{"body": png(x[0])}, {"body": png(light)}])
    assert list(a[0])[0] == list(a[1])[0]  # same top label for the digit and its large inverted copy


def test_text_handler_matches_the_model_and_batching_does_not_change_answers(handlers, tiny_checkpoints):
    handler, ctx = handlers["lstm"]
    model, ckpt = direct_model(tiny_checkpoints["lstm"])
    vocab = Vocab(ckpt["vocab"])
    texts = ["A gripping, beautifully acted film.", "Dull, overlong and pointless.", "fine"]
    with torch.no_grad():
        expected = torch.softmax(model(pad_batch([vocab.encode(t, 64) for t in texts])), -1)
    answers, statuses, _ = run_batch(
        handler, ctx, [{"body": texts[0]}, {"body": texts[1].encode()}, {"body": {"text": [texts[2], texts[0]]}}]
    )
    assert [s for s, _ in statuses] == [200] * 3
    flat = [answers[0], answers[1], *answers[2]]
    for i, answer in enumerate(flat[:3]):
        assert answer["label"] == ckpt["labels"][int(expected[i].argmax())]
        for label, p in answer["probabilities"].items():
            torch.testing.assert_close(p, expected[i, ckpt["labels"].index(label)].item(), **TOL)
    assert flat[3] == flat[0]  # the same text in another request of the batch gets the same answer
    alone, _, _ = run_batch(handler, ctx, [{"body": texts[1]}])
    assert alone[0] == answers[1]


TEXTS = ["In the beginning God created the heavens and the earth.", "The Lord is my shepherd."]


def direct_translations(path, beam: int = 1) -> list[str]:
    """TEXTS translated by the checkpoint's model called directly, greedily or with a beam."""
    model, ckpt = direct_model(path)
    tokenizer = SubwordTokenizer(ckpt["tokenizer"])
    batch = pad_batch([tokenizer.encode(t, bos_eos=True) for t in TEXTS])
    with torch.no_grad():
        out = model.greedy_decode(batch) if beam == 1 else model.beam_decode(batch, beam=beam)
    return [tokenizer.decode(row) for row in out.tolist()]


def test_translator_matches_greedy_decode_and_honours_max_length(handlers, tiny_checkpoints):
    handler, ctx = handlers["transformer"]
    texts, expected = TEXTS, direct_translations(tiny_checkpoints["transformer"])
    answers, statuses, _ = run_batch(
        handler, ctx, [{"body": texts[0]}, {"body": {"text": texts[1]}}, {"body": {"text": texts[0], "max_length": 3}}]
    )
    assert [s for s, _ in statuses] == [200] * 3
    assert [a["translation"] for a in answers[:2]] == expected
    assert len(answers[2]["translation"].split()) <= 3
    assert expected[0].startswith(answers[2]["translation"].rstrip(".,;:"))


def test_translator_beam_requests_share_a_batch_with_greedy_ones(handlers, tiny_checkpoints):
    handler, ctx = handlers["transformer"]
    texts, expected = TEXTS, direct_translations(tiny_checkpoints["transformer"], beam=3)
    alone, _, _ = run_batch(handler, ctx, [{"body": {"text": texts[0]}}])
    requests = [
        {"body": {"text": texts[0], "beam": 3}},
        {"body": {"text": texts[0]}},
        {"body": {"text": texts[1], "beam": 3}},
    ]
    answers, statuses, _ = run_batch(handler, ctx, requests)
    assert [s for s, _ in statuses] == [200] * 3
    # Each request answered as its own beam width decodes it, whatever else is in the batch.
    assert [answers[0]["translation"], answers[2]["translation"]] == expected
    assert answers[1] == alone[0]


# ----------------------------------------------------------------------------- bad input


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buf, format="PNG")  # 25 Mpx, a few kB on the wire
    return buf.getvalue()


BAD = {
    "cnn": [
        ({"body": b"\x00\x01garbage bytes"}, 400, "not valid base64"),
        ({"body": b"\x89PNG\r\n\x1a\nnot really a png"}, 400, "not a readable image"),
        ({"body": b""}, 400, "empty"),
        ({}, 400, "empty request"),
        ({"body": "!!!not-base64!!!"}, 400, "not valid base64"),
        ({"body": {"image": "abc"}}, 400, "JSON body must be"),
        ({"body": {"data": 12}}, 400, "'data' must be a base64 string"),
        ({"body": {"data": "aGVsbG8=", "topk": 0}}, 400, "'topk' must be a positive integer"),
        ({"body": {"data": "aGVsbG8=", "topk": 11}}, 400, "'topk' must be at most 10"),
        ({"body": b"{not json"}, 400, "not valid JSON"),
        ({"body": [1, 2, 3]}, 400, "expected an image"),
        ({"body": _bomb_png()}, 413, "5000x5000 pixels"),
        ({"body": {"data": "aGVsbG8=", "topk": "\u00fc"}}, 400, "'topk' must be a positive integer, got '\\xfc'"),
        ({"body": b'{"data":' * 100_000 + b"1" + b"}" * 100_000}, 400, "nested too deeply"),
    ],
    "lstm": [
        ({"body": b""}, 400, "empty text"),
        ({"body": "   "}, 400, "empty text"),
        ({"body": b"\xff\xfe\xfa bad utf-8"}, 400, "not valid UTF-8"),
        ({"body": "x" * 5001}, 413, "5001 characters"),
        ({"body": {"txt": "hello"}}, 400, "keys 'text'"),
        ({"body": {"text": 5}}, 400, "string or a list of strings"),
        ({"body": {"text": []}}, 400, "empty list"),
        ({"body": {"text": ["ok", 3]}}, 400, "string or a list of strings"),
        ({"body": {"text": ["ok"] * 65}}, 413, "65 entries"),
        ({"body": ["a bare list"]}, 400, "not a bare list"),
        ({"body": {"text": "x", "\u00e9": 1}}, 400, "got ['text', '\\xe9']"),
        ({"body": {"text": "x", "k" * 200_000: 1}}, 400, "kkkkkkkk..."),
        ({"body": {"text": "x", **{f"key{i}": i for i in range(1000)}}}, 400, "and 996 more"),
        ({"body": b'{"text":' * 100_000 + b'"x"' + b"}" * 100_000}, 400, "nested too deeply"),
    ],
    "transformer": [
        ({"body": b""}, 400, "empty text"),
        ({"body": b"\xc3\x28 bad utf-8"}, 400, "not valid UTF-8"),
        ({"body": "word " * 900}, 413, "4500 characters"),
        ({"body": {"text": "hello", "max_length": 0}}, 400, "'max_length' must be a positive integer"),
        ({"body": {"text": "hello", "max_length": "5"}}, 400, "'max_length' must be a positive integer"),
        ({"body": {"text": "hello", "max_length": 10_000}}, 400, "'max_length' must be at most"),
        ({"body": {"text": "hello", "temperature": 1}}, 400, "keys 'beam', 'max_length', 'text'"),
        ({"body": {"text": "hello", "beam": 0}}, 400, "'beam' must be a positive integer"),
        ({"body": {"text": "hello", "beam": 6}}, 400, "'beam' must be at most 5"),
        ({"body": {"text": "hello", "beam": "4"}}, 400, "'beam' must be a positive integer"),
        ({"body": {"text": "hello", "max_length": "\u00e9"}}, 400, "'max_length' must be a positive integer"),
    ],
}
GOOD = {"cnn": None, "lstm": {"body": "a warm, funny film"}, "transformer": {"body": "God is love."}}


@pytest.mark.parametrize("model", ["cnn", "lstm", "transformer"])
def test_every_bad_input_gets_its_own_4xx_and_its_neighbours_are_answered(model, handlers, digits):
    handler, ctx = handlers[model]
    good = GOOD[model] or {"body": png(digits[0][0])}
    reference, _, _ = run_batch(handler, ctx, [good])
    for bad, code, message in BAD[model]:
        answers, statuses, _ = run_batch(handler, ctx, [good, bad, good])
        assert statuses[0][0] == 200 and statuses[2][0] == 200, (bad, statuses)
        assert answers[0] == answers[2] == reference[0]
        status, phrase = statuses[1]
        assert status == code, (bad, statuses[1])
        assert message in phrase, (bad, phrase)
        # TorchServe frames the phrase by its length in characters and sends UTF-8: it must be
        # short printable ASCII, or the frontend drops the worker with the whole batch.
        assert all(" " <= c <= "~" for c in phrase) and len(phrase) <= 300, (bad, phrase[:80])
        assert answers[1] == {
            "code": code,
            "type": "PayloadTooLarge" if code == 413 else "InvalidInput",
            "message": phrase,
        }


def test_an_image_decoder_failing_in_any_way_fails_only_its_request(handlers, digits, monkeypatch):
    """A fuzzer found images on which Pillow raises NotImplementedError; any decoder error is a 400."""
    from handlers import image_classifier

    handler, ctx = handlers["cnn"]
    good = png(digits[0][0])
    real_open = image_classifier.Image.open

    def open_(fp, *a, **kw):
        if fp.getvalue().endswith(b"POISON"):
            raise NotImplementedError("unsupported tile layout")
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(image_classifier.Image, "open", open_)
    answers, statuses, _ = run_batch(handler, ctx, [{"body": good}, {"body": good + b"POISON"}, {"body": good}])
    assert [s for s, _ in statuses] == [200, 400, 200]
    assert "not a readable image (NotImplementedError)" in statuses[1][1]


def test_an_unexpected_parse_error_fails_only_its_request(handlers, monkeypatch):
    handler, ctx = handlers["lstm"]
    real_parse = handler.parse

    def parse(payload):
        if payload == "boom":
            raise KeyError("a parser bug")
        return real_parse(payload)

    monkeypatch.setattr(handler, "parse", parse)
    answers, statuses, _ = run_batch(handler, ctx, [{"body": "fine film"}, {"body": "boom"}, {"body": "fine film"}])
    assert [s for s, _ in statuses] == [200, 500, 200]
    assert answers[0] == answers[2] and answers[1]["message"] == "could not read the request (KeyError)"


def test_a_batch_of_only_bad_requests_returns_errors_without_running_the_model(handlers):
    handler, ctx = handlers["lstm"]
    answers, statuses, _ = run_batch(handler, ctx, [{"body": b""}, {"body": {"nope": 1}}])
    assert [s for s, _ in statuses] == [400, 400]
    assert all(a["code"] == 400 for a in answers)


def test_image_over_the_byte_limit_is_413(tiny_checkpoints, digits):
    handler, ctx = load_handler("cnn", tiny_checkpoints["cnn"], {"max_bytes": 100})
    _, statuses, _ = run_batch(handler, ctx, [{"body": png(digits[0][0])}])
    assert statuses[0][0] == 413 and "the limit is 100" in statuses[0][1]


def test_initialize_fails_loudly_for_the_wrong_checkpoint_or_options(tiny_checkpoints):
    with pytest.raises(ValueError, match="holds a text-classification model .lstm., this handler serves image-class"):
        load_handler("cnn", tiny_checkpoints["lstm"])
    with pytest.raises(ValueError, match="unknown handler options"):
        load_handler("lstm", tiny_checkpoints["lstm"], {"max_char": 10})


def test_a_form_encoded_request_gets_415_with_how_to_send_it(handlers):
    handler, ctx = handlers["lstm"]
    headers = [{"Content-Type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain; charset=utf-8"}]
    answers, statuses, _ = run_batch(handler, ctx, [{"a warm film": b""}, {"body": "a warm film"}], headers)
    assert statuses[0][0] == 415 and "HTML form" in statuses[0][1] and "curl -T" in statuses[0][1]
    assert statuses[1][0] == 200 and answers[1]["label"] in ("rotten", "fresh")


def test_answers_are_utf8_json(handlers):
    from ts.context import RequestProcessor

    handler, ctx = handlers["transformer"]
    ctx.request_processor = [RequestProcessor({})]
    raw = handler.handle([{"body": "God is love."}], ctx)[0]
    assert "\\u00" not in raw.decode("utf-8")
    assert ctx.get_response_content_type(0) == "application/json; charset=utf-8"


def test_int8_handlers_answer_like_eager(tiny_checkpoints):
    for model, body in (("lstm", "a warm and funny film"), ("transformer", "God is love.")):
        eager, ctx = load_handler(model, tiny_checkpoints[model])
        fast, ctx8 = load_handler(model, tiny_checkpoints[model], {"optimize": "int8"})
        (a,), (sa,), _ = run_batch(eager, ctx, [{"body": body}])
        (b,), (sb,), _ = run_batch(fast, ctx8, [{"body": body}])
        assert sa[0] == sb[0] == 200
        if model == "lstm":
            assert a["label"] == b["label"] and abs(a["probabilities"]["fresh"] - b["probabilities"]["fresh"]) < 0.05
        else:
            assert isinstance(b["translation"], str)
    with pytest.raises(ValueError, match="optimize must be none, int8 or aoti"):
        load_handler("lstm", tiny_checkpoints["lstm"], {"optimize": "fp4"})


def test_the_threads_option_sets_torch_threads_and_refuses_bad_values(tiny_checkpoints):
    before = torch.get_num_threads()
    try:
        load_handler("lstm", tiny_checkpoints["lstm"], {"threads": 3})
        assert torch.get_num_threads() == 3
        load_handler("lstm", tiny_checkpoints["lstm"], {"threads": 0})  # 0 leaves the count alone
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    for bad in (-1, "2", True, 1.5):
        with pytest.raises(ValueError, match="threads must be an integer >= 0"):
            load_handler("lstm", tiny_checkpoints["lstm"], {"threads": bad})


# ----------------------------------------------------------------------------- explanations

EXPLAIN = {"explain": "True"}  # the request header TorchServe sets on /explanations/<model>


def test_cnn_attributions_sit_on_the_strokes_and_add_up_to_the_logit(handlers, tiny_checkpoints, digits):
    handler, ctx = handlers["cnn"]
    x, _ = digits
    requests = [{"body": png(img)} for img in x[:3]] + [
        {"body": {"data": base64.b64encode(png(x[3])).decode(), "heatmap": True}}
    ]
    answers, statuses, _ = run_batch(handler, ctx, requests, [EXPLAIN] * 4)
    assert [s for s, _ in statuses] == [200] * 4
    predictions, _, _ = run_batch(handler, ctx, [{"body": png(img)} for img in x[:4]])
    model, ckpt = direct_model(tiny_checkpoints["cnn"])
    pre = ckpt["preprocess"]
    for img, answer, predicted in zip(x[:4], answers, predictions, strict=True):
        attr = np.array(answer["attributions"])
        assert attr.shape == (28, 28) and answer["label"] == max(predicted, key=predicted.get)
        strokes = img > 0
        # The baseline is a black image: the background carries nothing, the drawn strokes everything.
        assert np.abs(attr[~strokes]).sum() < 1e-6 * np.abs(attr).sum() + 1e-9
        assert np.abs(attr[strokes]).sum() > 0
        # Integrated Gradients' completeness: the attributions sum to the logit's change from black.
        with torch.no_grad():
            inp = torch.from_numpy(normalize(img[None], pre["mean"], pre["std"]))
            black = torch.full_like(inp, (0 - pre["mean"]) / pre["std"])
            label = ckpt["labels"].index(answer["label"])
            delta = float(model(inp)[0, label] - model(black)[0, label])
        assert attr.sum() == pytest.approx(delta, rel=0.1, abs=0.05)
    heatmap = Image.open(io.BytesIO(base64.b64decode(answers[3]["heatmap_png"])))
    assert heatmap.size == (224, 224) and "heatmap_png" not in answers[0]


def test_lstm_token_scores_point_the_way_the_answer_moves(handlers):
    handler, ctx = handlers["lstm"]
    text = "a gripping , beautifully acted film with a dull and far too long ending"
    [answer], [status], _ = run_batch(handler, ctx, [{"body": {"text": text}}], [EXPLAIN])
    assert status[0] == 200, status
    tokens = answer["tokens"]
    assert [t for t, _ in tokens] == text.split()
    label = answer["label"]
    top = max(range(len(tokens)), key=lambda i: tokens[i][1])
    assert tokens[top][1] > 0
    # Replacing the word that pushed most towards the label (with an unknown word: the baseline)
    # lowers the label's probability.
    words = text.split()
    words[top] = "qqqqqq"
    [before, after], _, _ = run_batch(handler, ctx, [{"body": text}, {"body": " ".join(words)}])
    assert after["probabilities"][label] < before["probabilities"][label]


def test_translator_alignment_is_a_distribution_over_the_source_per_target_token(handlers):
    handler, ctx = handlers["transformer"]
    text = "In the beginning God created the heavens and the earth."
    # Over gRPC there is no explanations call: the body asks with "explain": true, as here.
    answers, statuses, _ = run_batch(handler, ctx, [{"body": {"text": text, "explain": True}}, {"body": text}])
    assert [s for s, _ in statuses] == [200, 200]
    explained, predicted = answers
    assert explained["translation"] == predicted["translation"]
    [sentence] = explained["sentences"]
    align = np.array(sentence["alignment"])
    assert sentence["source_tokens"][0] == "<bos>" and sentence["source_tokens"][-1] == "<eos>"
    assert align.shape == (len(sentence["target_tokens"]), len(sentence["source_tokens"]))
    assert np.allclose(align.sum(1), 1.0, atol=1e-3)


PARAGRAPH = (
    "In the beginning God created the heavens and the earth. The earth was without form. "
    "And God said, Let there be light: and there was light. God saw the light, that it was good. "
    "And the evening and the morning were the first day."
)


def test_translator_translates_a_paragraph_sentence_by_sentence(handlers):
    handler, ctx = handlers["transformer"]
    sentences = handler.sentences(PARAGRAPH)
    assert len(sentences) == 5 and len(handler.check(PARAGRAPH)) == 5
    # The paragraph, and its five sentences sent as a list, in one batch with a neighbour.
    requests = [{"body": PARAGRAPH}, {"body": {"text": sentences}}, {"body": "God is love."}]
    answers, statuses, _ = run_batch(handler, ctx, requests)
    assert [s for s, _ in statuses] == [200] * 3
    one_by_one = [a["translation"] for a in answers[1]]
    assert len(one_by_one) == 5 and all(one_by_one)
    assert answers[0]["translation"] == " ".join(one_by_one)
    alone, _, _ = run_batch(handler, ctx, [{"body": "God is love."}])
    assert answers[2] == alone[0]


def test_translator_cuts_an_overlong_sentence_at_clauses_then_windows(handlers):
    handler, ctx = handlers["transformer"]
    window = handler.max_len - 2
    clauses = ", ".join(["and the waters were gathered together unto one place"] * 6) + "."
    pieces = handler.check(clauses)
    assert len(pieces) > 1 and all(len(p) <= handler.max_len for p in pieces)
    # No comma to cut at: windows of the model's positions.
    words = " ".join(["light"] * (3 * window))
    windows = handler.check(words)
    assert len(windows) >= 3 and all(len(p) <= handler.max_len for p in windows)
    answers, statuses, _ = run_batch(handler, ctx, [{"body": clauses}, {"body": words}])
    assert [s for s, _ in statuses] == [200, 200] and all(a["translation"] for a in answers)


def test_translator_translates_a_400_word_text_in_bounded_time(handlers):
    handler, ctx = handlers["transformer"]
    text = " ".join(" ".join([PARAGRAPH] * 10).split()[:400]) + "."
    assert len(text.split()) == 400 and len(text) <= handler.options["max_chars"]
    t0 = time.perf_counter()
    answers, statuses, _ = run_batch(handler, ctx, [{"body": text}])
    took = time.perf_counter() - t0
    assert statuses[0][0] == 200 and len(handler.check(text)) >= 45  # 9 paragraphs of 5 sentences, and some
    assert len(answers[0]["translation"].split()) > 45
    assert took < 60, f"{took:.1f}s: the frontend's responseTimeout would fail this request"


def test_translator_alignment_covers_every_sentence_of_a_text(handlers):
    handler, ctx = handlers["transformer"]
    answers, statuses, _ = run_batch(
        handler, ctx, [{"body": {"text": PARAGRAPH, "explain": True}}, {"body": PARAGRAPH}]
    )
    assert [s for s, _ in statuses] == [200, 200]
    explained = answers[0]
    assert explained["translation"] == answers[1]["translation"]
    assert set(explained) == {"translation", "method", "sentences"}
    # Each sentence has its own alignment over its own source tokens: the response grows with the
    # sentences, not with their square (one dense matrix of mostly zeros did).
    assert [s["source_tokens"][1:-1] for s in explained["sentences"]] == [
        [handler.tokenizer.piece(i) for i in ids[1:-1]] for ids in handler.check(PARAGRAPH)
    ]
    for sentence in explained["sentences"]:
        align = np.array(sentence["alignment"])
        assert align.shape == (len(sentence["target_tokens"]), len(sentence["source_tokens"]))
        assert np.allclose(align.sum(1), 1.0, atol=1e-3)
    assert explained["translation"] == " ".join(s["translation"] for s in explained["sentences"] if s["translation"])


def test_translator_decodes_in_chunks_with_the_same_answers(handlers):
    """A batch's pieces are decoded in chunks of at most DECODE_ROWS rows (beam search's cost per
    row grows with the rows of one call); chunked or whole, the answers are the same."""
    handler, ctx = handlers["transformer"]

    def requests():  # anew for each batch: the handler takes "explain" out of the body it reads
        return [
            {"body": PARAGRAPH},
            {"body": {"text": [PARAGRAPH, "God is love."], "beam": 3}},
            {"body": {"text": PARAGRAPH, "explain": True}},
        ]

    whole, statuses, _ = run_batch(handler, ctx, requests())
    with mock.patch("handlers.translator.DECODE_ROWS", 3):
        chunked, chunked_statuses, _ = run_batch(handler, ctx, requests())
    assert [s for s, _ in statuses] == [s for s, _ in chunked_statuses] == [200, 200, 200]
    assert chunked[:2] == whole[:2]
    assert [(s["translation"], s["source_tokens"]) for s in chunked[2]["sentences"]] == [
        (s["translation"], s["source_tokens"]) for s in whole[2]["sentences"]
    ]


def limited(handler, **options):
    """The handler with some options changed for one test (small limits keep the decodes short)."""
    return mock.patch.dict(handler.options, options)


def test_translator_refuses_a_request_over_its_decoder_rows_with_413(handlers):
    handler, ctx = handlers["transformer"]
    with limited(handler, max_rows=12):
        twelve = " ".join(["Go."] * 12)
        requests = [
            {"body": {"text": [twelve]}},  # 12 pieces: at the limit
            {"body": {"text": [twelve, "Go."]}},  # 13 pieces over two texts
            {"body": {"text": "Go. Come. Stay.", "beam": 5}},  # 3 pieces x beam 5 = 15 rows
            {"body": "God is love."},
        ]
        answers, statuses, _ = run_batch(handler, ctx, requests)
    assert [s for s, _ in statuses] == [200, 413, 413, 200]
    assert "13 sentence pieces x beam 1 = 13 decoder rows, the limit is 12" in statuses[1][1]
    assert "3 sentence pieces x beam 5 = 15 decoder rows" in statuses[2][1]
    alone, _, _ = run_batch(handler, ctx, [{"body": "God is love."}])
    assert answers[3] == alone[0]


def test_a_full_batch_admits_the_smallest_requests_first_and_503s_the_rest(handlers):
    """Two requests at the row limit and two small neighbours, in a batch of 20 rows: the
    neighbours and the first large request are decoded; the second large one gets 503 alone."""
    handler, ctx = handlers["transformer"]
    large = {"body": " ".join(["Go."] * 12)}
    with limited(handler, max_rows=12, max_batch_rows=20):
        requests = [large, {"body": "God is love."}, large, {"body": {"text": ["Jesus wept.", "God is love."]}}]
        answers, statuses, _ = run_batch(handler, ctx, requests)
    assert [s for s, _ in statuses] == [200, 200, 503, 200]
    assert "this batch is full (15 of 20 decoder rows taken, the request needs 12): retry" in statuses[2][1]
    assert answers[2] == {"code": 503, "type": "BatchFull", "message": statuses[2][1]}
    alone, _, _ = run_batch(handler, ctx, [large, {"body": "God is love."}])
    assert answers[0] == alone[0] and answers[1] == alone[1]


def test_an_explanation_over_its_piece_limit_is_413(handlers):
    handler, ctx = handlers["transformer"]
    with limited(handler, max_explain_pieces=4):
        requests = [{"body": {"text": PARAGRAPH, "explain": True}}, {"body": {"text": PARAGRAPH}}]
        answers, statuses, _ = run_batch(handler, ctx, requests)
    assert [s for s, _ in statuses] == [413, 200]
    assert "an explanation covers at most 4 sentence pieces, the text has 5" in statuses[0][1]


def test_explanations_follow_the_bad_input_rules_and_leave_predictions_alone(handlers):
    handler, ctx = handlers["lstm"]
    requests = [
        {"body": {"text": "a warm film", "explain": True}},
        {"body": {"text": "a warm film", "explain": "yes"}},
        {"body": {"text": ""}},
        {"body": "a warm film"},
    ]
    answers, statuses, _ = run_batch(handler, ctx, requests, [{}, {}, EXPLAIN, {}])
    assert [s for s, _ in statuses] == [200, 400, 400, 200]
    assert "tokens" in answers[0] and "'explain' must be true or false" in statuses[1][1]
    assert answers[3]["label"] in ("rotten", "fresh") and "tokens" not in answers[3]


def test_an_optimised_variant_refuses_explanations_with_501(tiny_checkpoints):
    handler, ctx = load_handler("lstm", tiny_checkpoints["lstm"], {"optimize": "int8"})
    answers, statuses, _ = run_batch(handler, ctx, [{"body": "a warm film"}, {"body": "a warm film"}], [EXPLAIN, {}])
    assert statuses[0][0] == 501 and "optimised variant" in statuses[0][1]
    assert statuses[1][0] == 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("model", ["cnn", "lstm", "transformer"])
def test_a_handler_on_the_gpu_answers_as_on_the_cpu(tiny_checkpoints, model, digits):
    body = png(digits[0][0]) if model == "cnn" else "God is love, a warm and funny film."
    cpu, _, _ = run_batch(*load_handler(model, tiny_checkpoints[model]), [{"body": body}])
    handler, ctx = load_handler(model, tiny_checkpoints[model], gpu=0)
    assert handler.device.type == "cuda"
    gpu, statuses, _ = run_batch(handler, ctx, [{"body": body}])
    assert statuses[0][0] == 200
    if model == "transformer":
        assert gpu == cpu
    else:
        flat = lambda a: a if model == "cnn" else a["probabilities"]  # noqa: E731
        assert flat(gpu[0]).keys() == flat(cpu[0]).keys()
        assert all(abs(flat(gpu[0])[k] - flat(cpu[0])[k]) < 1e-3 for k in flat(cpu[0]))


def test_the_batch_log_line_counts_the_items(handlers, caplog):
    handler, ctx = handlers["lstm"]
    caplog.set_level(logging.DEBUG, logger="handlers.base")
    run_batch(
        handler,
        ctx,
        [{"body": {"text": ["a warm film", "a dull film"]}}, {"body": "fine"}, {"body": ""}],
        [{}, EXPLAIN, {}],
    )
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch_size=")]
    assert line.startswith("batch_size=3 items=3 failed=1 ")  # 2 texts + 1 explained text; the empty one refused
