import json
import subprocess
import sys

import pytest
import torch

from handlers import checkpoint
from models.text import SubwordTokenizer, Vocab, pad_batch
from scripts import train
from scripts.common import ROOT, CLIError
from tests.helpers import tiny_train

pytestmark = pytest.mark.slow


def _inputs(ckpt: dict) -> tuple:
    torch.manual_seed(0)
    if ckpt["model_name"] == "cnn":
        return (torch.randn(4, 1, 28, 28),)
    if ckpt["model_name"] == "lstm":
        v = Vocab(ckpt["vocab"])
        return (pad_batch([v.encode("a gripping, funny film"), v.encode("dull and far too long")]),)
    t = SubwordTokenizer(ckpt["tokenizer"])
    return (pad_batch([t.encode("In the beginning", 8, bos_eos=True), t.encode("God said", 8, bos_eos=True)]),)


@pytest.mark.parametrize("model", ["cnn", "lstm", "transformer"])
def test_tiny_run_writes_a_self_describing_checkpoint_that_rebuilds_identically(model, tiny_checkpoints):
    path = tiny_checkpoints[model]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["model_name"] == model and ckpt["format_version"] == checkpoint.FORMAT_VERSION
    for key in ("config", "state_dict", "metrics", "data", "versions", "git_commit", "train_args", "epoch"):
        assert key in ckpt, key
    assert ckpt["versions"]["torch"] == torch.__version__
    assert len(ckpt["data"]["fingerprint"]) == 64 and ckpt["epoch"] == 1
    assert set(ckpt["metrics"]["test"]) >= (
        {"accuracy"} if model != "transformer" else {"loss", "bleu", "bleu20", "perplexity"}
    )
    if model == "transformer":
        assert isinstance(ckpt["tokenizer"], bytes) and ckpt["config"]["tie_embeddings"]
        sd = ckpt["state_dict"]  # the tied matrix is stored once, not three times
        assert sd["src_embed.weight"].data_ptr() == sd["tgt_embed.weight"].data_ptr() == sd["out.weight"].data_ptr()
    else:
        assert ckpt["labels"]
    # The same weights, rebuilt twice from the stored config, give identical outputs.
    a, b = checkpoint.rebuild(ckpt), checkpoint.rebuild(checkpoint.load(path))
    x = _inputs(ckpt)
    if model == "transformer":
        torch.testing.assert_close(a.greedy_decode(*x), b.greedy_decode(*x), rtol=0, atol=0)
    else:
        torch.testing.assert_close(a(*x), b(*x), rtol=0, atol=0)


def test_a_trained_cnn_learns_something(tmp_path):
    ckpt = tiny_train("cnn", tmp_path / "cnn", "--epochs", "2", "--limit", "1000")
    assert ckpt["metrics"]["test"]["accuracy"] > 0.5  # chance is 0.1


def test_another_init_seed_trains_another_model_on_the_same_split(tiny_checkpoints, tmp_path):
    base = torch.load(tiny_checkpoints["cnn"], map_location="cpu", weights_only=True)
    other = tiny_train("cnn", tmp_path / "seed1", "--init-seed", "1")
    assert other["data"]["fingerprint"] == base["data"]["fingerprint"]  # the same held-out test split
    assert other["train_args"]["init_seed"] == 1 and base["train_args"]["init_seed"] == 0
    assert any(not torch.equal(w, base["state_dict"][k]) for k, w in other["state_dict"].items())


@pytest.mark.slow  # trains beyond the tiny configuration
def test_shuffled_labels_train_a_model_that_learns_nothing(tmp_path):
    # As test_a_trained_cnn_learns_something, which scores above 0.5, but for the labels.
    ckpt = tiny_train("cnn", tmp_path / "shuffled", "--shuffle-labels", "--epochs", "2", "--limit", "1000")
    assert ckpt["metrics"]["test"]["accuracy"] < 0.3  # ten digits: chance is 0.1
    with pytest.raises(CLIError, match="not a classifier"):
        train.main(["--model", "transformer", "--shuffle-labels", "--epochs", "1", "--limit", "200"])


def test_resume_continues_from_last_and_refuses_another_model(tmp_path):
    out = tmp_path / "cnn"
    tiny_train("cnn", out)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and "optimizer" in last
    ckpt = tiny_train("cnn", out, "--epochs", "2", "--resume", str(out / "last.pt"))
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    assert ckpt["metrics"]["val"]["accuracy"] >= last["metrics"]["val"]["accuracy"]
    with pytest.raises(train.CLIError, match="checkpoint is for model 'cnn', not 'lstm'"):
        train.main(["--model", "lstm", "--resume", str(out / "last.pt"), "--output-dir", str(tmp_path / "x")])


def test_set_changes_network_fields_and_refuses_what_the_data_decides(tmp_path):
    from models.transformer import TransformerConfig
    from scripts.registry import load_dataset
    from scripts.tasks import TaskOptions, TranslationTask

    task = TranslationTask(load_dataset("transformer", limit=300), None, TaskOptions(vocab_size=200))
    cfg = train.network_config(TransformerConfig, task, ["d_model=64", "num_encoder_layers=3", "dropout=0.3"])
    assert (cfg["d_model"], cfg["num_encoder_layers"], cfg["dropout"]) == (64, 3, 0.3)
    assert cfg["src_vocab_size"] == len(task.tokenizer)
    for bad, message in [
        ("src_vocab_size=10", "comes from the data"),
        ("d_model=wide", "must be int"),
        ("width=3", "expected FIELD=VALUE"),
        ("d_model", "expected FIELD=VALUE"),
    ]:
        with pytest.raises(train.CLIError, match=message):
            train.network_config(TransformerConfig, task, [bad])


def test_quick_fills_only_what_the_command_line_left_unset():
    quick = train.resolve_defaults(train.get_args_parser().parse_args(["--model", "lstm", "--quick"]))
    assert (quick.epochs, quick.limit, quick.batch_size) == (2, 4000, 64)
    mine = train.resolve_defaults(
        train.get_args_parser().parse_args(
            ["--model", "lstm", "--quick", "--epochs", "5", "--limit", "300", "--bleu-samples", "7"]
        )
    )
    assert (mine.epochs, mine.limit, mine.bleu_samples) == (5, 300, 7)
    full = train.resolve_defaults(train.get_args_parser().parse_args(["--model", "transformer", "--device", "cpu"]))
    assert (full.epochs, full.limit, full.lr, full.bleu_samples, full.batch_tokens) == (4, None, 1e-3, 500, 4000)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "resnet"], "invalid choice: 'resnet'"),
        (
            ["--model", "lstm", "--data", "/nonexistent/reviews.csv"],
            "train: error: /nonexistent/reviews.csv: file not found",
        ),
        (
            ["--model", "cnn", "--resume", "/nonexistent/last.pt"],
            "train: error: /nonexistent/last.pt: checkpoint not found",
        ),
        (["--model", "cnn", "--epochs", "0"], "train: error: --epochs must be positive"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line_and_no_traceback(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.train", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1


def test_the_cached_greedy_decode_equals_the_uncached_one_on_the_test_split(tiny_checkpoints):
    from scripts import registry
    from scripts.registry import load_dataset
    from scripts.tasks import TaskOptions

    ckpt = registry.load_checkpoint(tiny_checkpoints["transformer"])
    args = ckpt["train_args"]
    ds = load_dataset("transformer", args["data"], seed=args["seed"], limit=args["limit"])
    task = registry.get("transformer").task(ds, ckpt, TaskOptions.from_args(args))
    model = checkpoint.rebuild(ckpt)
    rows = 0
    for src, _, _ in task.batches("test", 32, None):
        assert torch.equal(model.greedy_decode(src), model.greedy_decode(src, cache=False))
        rows += len(src)
    assert rows == len(ds.splits["test"]) > 0


def test_translation_batches_are_token_bounded_cover_each_pair_once_and_keep_the_test_split_whole():
    import numpy as np

    from scripts.registry import load_dataset
    from scripts.tasks import TaskOptions, TranslationTask

    ds = load_dataset("transformer", limit=600)
    test_before = ds.splits["test"].copy()
    task = TranslationTask(ds, None, TaskOptions(max_tokens=40, vocab_size=300, batch_tokens=600))
    assert np.array_equal(ds.splits["test"], test_before)  # test_all: every pair, long ones cut
    assert all(len(task.src[i]) <= 42 and len(task.tgt[i]) <= 42 for i in ds.splits["train"])
    assert set(task.test20) <= set(test_before) and len(task.test20) > 0
    for rng in (np.random.default_rng(1), None):
        plan = task.plan("train", 16, rng)
        assert sorted(np.concatenate(plan).tolist()) == sorted(ds.splits["train"].tolist())
        for g in plan:
            widest = max(max(len(task.src[i]), len(task.tgt[i])) for i in g)
            assert len(g) <= 16 and (len(g) == 1 or len(g) * 2 * widest <= 600)
    assert task.n_batches("train", 16, np.random.default_rng(1)) == len(
        task.plan("train", 16, np.random.default_rng(1))
    )


def test_the_training_report_reads_what_each_checkpoint_stores(tiny_checkpoints, tmp_path):
    from scripts import report

    out = tmp_path / "training.json"
    argv = ["--models", *tiny_checkpoints, "--manifest", str(tmp_path / "none.json"), "--output", str(out)]
    argv += [f"--checkpoint={m}={p}" for m, p in tiny_checkpoints.items()]
    assert report.main(argv) == 0
    models = json.loads(out.read_text())["models"]
    for model, path in tiny_checkpoints.items():
        ck = checkpoint.load(path)
        stored = sum(t.numel() for t in ck["state_dict"].values())  # buffers too, a tied matrix twice
        assert 0 < models[model]["parameters"] <= stored
        assert models[model]["parameters"] < stored or not ck["config"].get("tie_embeddings"), model
        assert models[model]["test"] == ck["metrics"]["test"] and models[model]["split_sizes"] == ck["data"]["sizes"]
        assert models[model]["wall_seconds"] > 0 and "archive_bytes" not in models[model]
    samples = models["transformer"]["samples"]  # decoded in process by the handler, as a worker does
    assert [x["beam"] for x in samples] == [5] * 8 + [1] * 3 and all(isinstance(x["model"], str) for x in samples)
    assert all(len(x["reference"].split()) <= 14 for x in samples[:8]) and "samples" not in models["cnn"]
    with pytest.raises(CLIError, match="no checkpoint at"):
        report.main(["--checkpoints", str(tmp_path / "nothing")])
