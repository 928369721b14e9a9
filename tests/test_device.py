import pytest
import torch
from torch.utils.data import TensorDataset

from fedxray.data import LABELS
from fedxray.device import predict
from fedxray.model import build_model


@pytest.mark.parametrize("training", [False, True])
def test_predict_gives_the_model_back_in_the_mode_it_found_it(training):
    # predict used to leave every model in train mode: a model set to eval() for an explanation or
    # a saved model from fedxray.load_model came back training (layer4's BatchNorm updating its
    # statistics on the next forward pass).
    model = build_model(weights=None).train(training)
    images = TensorDataset(torch.rand(3, 3, 64, 64), torch.zeros(3, len(LABELS)))
    probs, labels = predict(model, images, 2, torch.device("cpu"))
    assert probs.shape == labels.shape == (3, len(LABELS))
    assert model.training is training
    assert all(m.training is training for m in model.layer4.modules())
