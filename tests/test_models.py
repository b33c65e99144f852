import dataclasses

import pytest
import torch

from models import build_model, config_from_dict, config_to_dict, network_path, resolve_network
from models.cnn import CNNClassifier, CNNConfig
from models.lstm import LSTMClassifier, LSTMConfig
from models.text import BOS_ID, EOS_ID, PAD_ID
from models.transformer import TransformerConfig, Translator

NETWORKS = [CNNClassifier, LSTMClassifier, Translator]


def test_cnn_forward_shape():
    model = build_model(CNNClassifier, config_to_dict(CNNConfig(num_classes=7))).eval()
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 7)


def test_lstm_forward_shape_and_padding_does_not_change_the_answer():
    model = build_model(LSTMClassifier, config_to_dict(LSTMConfig(vocab_size=50))).eval()
    ids = torch.tensor([[5, 6, 7, PAD_ID, PAD_ID], [8, 9, 10, 11, 12]])
    out = model(ids)
    assert out.shape == (2, 2)
    alone = model(ids[:1, :3])  # the same sentence without padding
    torch.testing.assert_close(out[:1], alone)
    assert torch.isfinite(model(torch.full((1, 4), PAD_ID))).all()  # an all-padding row stays finite


def test_transformer_forward_shape():
    cfg = TransformerConfig(src_vocab_size=30, tgt_vocab_size=40, d_model=32, nhead=4, dim_feedforward=64, max_len=16)
    model = build_model(Translator, config_to_dict(cfg)).eval()
    src = torch.randint(4, 30, (3, 9))
    tgt = torch.randint(4, 40, (3, 6))
    assert model(src, tgt).shape == (3, 6, 40)


def test_greedy_decode_is_batched_stops_at_eos_and_respects_max_length():
    torch.manual_seed(0)
    cfg = TransformerConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=32, nhead=4, dim_feedforward=64, max_len=12)
    model = build_model(Translator, config_to_dict(cfg)).eval()
    # Make <eos> win at once for every input by biasing the output layer.
    with torch.no_grad():
        model.out.bias.zero_()
        model.out.bias[EOS_ID] = 100.0
    src = torch.tensor([[BOS_ID, 5, 6, EOS_ID], [BOS_ID, 7, EOS_ID, PAD_ID]])
    out = model.greedy_decode(src)
    assert out.tolist() == [[EOS_ID], [EOS_ID]]
    # Without the bias it runs to the length limit, which is capped by the config.
    with torch.no_grad():
        model.out.bias[EOS_ID] = -100.0
    assert model.greedy_decode(src, max_length=5).shape == (2, 5)
    assert model.greedy_decode(src, max_length=500).shape == (2, cfg.max_len - 1)
    # Each row decodes as it would alone.
    torch.testing.assert_close(model.greedy_decode(src[1:, :3]), model.greedy_decode(src)[1:])


def test_every_config_round_trips_through_plain_types():
    for cls in NETWORKS:
        cfg = cls.config_cls()
        plain = config_to_dict(cfg)
        assert all(not isinstance(v, tuple) for v in plain.values())
        assert config_from_dict(cls.config_cls, plain) == cfg
    with pytest.raises(ValueError, match="has no fields"):
        config_from_dict(CNNConfig, {"chanels": [1, 2]})


def test_every_config_field_has_a_default_and_the_model_keeps_its_config():
    for cls in NETWORKS:
        for f in dataclasses.fields(cls.config_cls):
            assert f.default is not dataclasses.MISSING, f"{cls.__name__}.{f.name}"
        assert build_model(network_path(cls), config_to_dict(cls.config_cls())).config == cls.config_cls()


@pytest.mark.parametrize(
    "path",
    [
        "os:system",  # outside the package: a checkpoint must not pick the code that runs
        "models.cnn:torch",  # not a class
        "models.text:Vocab",  # a class, not a network
        "models.cnn:Nope",
        "models.nope:CNNClassifier",
        "models.cnn.x:CNNClassifier",
        "models.cnn:CNNClassifier.__init__",
    ],
)
def test_a_checkpoint_names_only_networks_of_the_models_package(path):
    with pytest.raises(ValueError, match="network"):
        resolve_network(path)
    assert resolve_network("models.cnn:CNNClassifier") is CNNClassifier


def _translator(seed: int = 0) -> Translator:
    torch.manual_seed(seed)
    cfg = TransformerConfig(src_vocab_size=40, tgt_vocab_size=50, d_model=32, nhead=4, dim_feedforward=64, max_len=20)
    return build_model(Translator, config_to_dict(cfg)).eval()


def test_the_cached_decode_step_equals_the_full_decoder():
    model = _translator()
    src = torch.tensor([[BOS_ID, 5, 6, 7, EOS_ID], [BOS_ID, 8, EOS_ID, PAD_ID, PAD_ID]])
    tgt = torch.tensor([[BOS_ID, 9, 10, 11], [BOS_ID, 12, 13, 14]])
    memory, src_mask = model.encode(src)
    full = model.decode(tgt, memory, src_mask)  # (B, T, V): every position at once
    cache = model.start_cache(memory, src_mask)
    for t in range(tgt.size(1)):
        torch.testing.assert_close(model.decode_step(tgt[:, t], cache), full[:, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_with_the_cache_equals_greedy_without_and_beam_1_is_greedy(seed):
    model = _translator(seed)
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 40, (6, 9), generator=g)
    src[:, 0] = BOS_ID
    src[3:, 5:] = PAD_ID  # rows of different lengths in one batch
    cached, uncached = model.greedy_decode(src), model.greedy_decode(src, cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(model.beam_decode(src, beam=1), cached)


def test_beam_search_is_batched_and_finds_at_least_greedys_score():
    model = _translator(3)
    src = torch.randint(4, 40, (4, 7), generator=torch.Generator().manual_seed(3))
    src[:, 0] = BOS_ID

    def logprob(row_src, ids):
        # The sequence's log-probability under the model (teacher forcing), up to its <eos>.
        ids = ids.tolist()
        ids = ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else [i for i in ids if i != PAD_ID]
        tgt = torch.tensor([[BOS_ID, *ids]])
        with torch.no_grad():
            logp = torch.log_softmax(model(row_src[None], tgt[:, :-1]), -1)[0]
        return float(logp.gather(1, tgt[0, 1:, None]).sum())

    greedy = model.greedy_decode(src, max_length=8)
    beam = model.beam_decode(src, beam=4, max_length=8, alpha=0.0)
    assert beam.shape[0] == 4 and beam.shape[1] <= 8
    for i in range(4):
        assert logprob(src[i], beam[i]) >= logprob(src[i], greedy[i]) - 1e-4
        # Each row alone decodes as it does in the batch.
        assert torch.equal(
            model.beam_decode(src[i : i + 1], beam=4, max_length=8, alpha=0.0)[0, : beam.shape[1]], beam[i]
        )


def test_tied_embeddings_share_one_matrix_and_survive_a_weights_only_round_trip(tmp_path):
    cfg = TransformerConfig(src_vocab_size=30, tgt_vocab_size=30, d_model=32, nhead=4, dim_feedforward=64, max_len=16)
    model = build_model(Translator, config_to_dict(dataclasses.replace(cfg, tie_embeddings=True))).eval()
    untied = build_model(Translator, config_to_dict(cfg))
    assert model.src_embed.weight is model.tgt_embed.weight is model.out.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(model) == 2 * 30 * 32
    torch.save(model.state_dict(), tmp_path / "w.pt")
    again = build_model(Translator, config_to_dict(dataclasses.replace(cfg, tie_embeddings=True)))
    again.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    src = torch.randint(4, 30, (2, 7))
    torch.testing.assert_close(again.eval()(src, src), model(src, src), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one vocabulary"):
        Translator(dataclasses.replace(cfg, tgt_vocab_size=40, tie_embeddings=True))
