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
