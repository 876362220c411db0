"""vlmfast.nn.ClipLoss / SigLipLoss: the papers' initial temperature and bias, the clamp of the
scale at 100, and the loss and gradients of the learnable parameters against the float64 oracle."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close
from vlmfast import nn as vnn
from vlmfast.ops import reference


def _features(B=23, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(B, D, generator=g)
    return shared + 0.6 * torch.randn(B, D, generator=g), shared + 0.6 * torch.randn(B, D, generator=g)


def test_initial_parameters_follow_the_papers():
    clip, siglip = vnn.ClipLoss(), vnn.SigLipLoss()
    assert clip.logit_scale.shape == () and clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert siglip.logit_scale.item() == pytest.approx(math.log(10.0))
    assert siglip.logit_bias.item() == pytest.approx(-10.0)
    assert {n for n, _ in siglip.named_parameters()} == {"logit_scale", "logit_bias"}


def test_clip_loss_and_gradients(backend):
    img, txt = _features()
    module = vnn.ClipLoss(init_logit_scale=math.log(20.0))
    loss = module(img, txt)
    loss.backward()
    log_scale = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    expected = reference.infonce_loss(img.double(), txt.double(), log_scale.exp())
    expected.backward()
    assert_close(loss.detach(), expected.detach(), name="loss")
    assert_close(module.logit_scale.grad, log_scale.grad, name="d logit_scale")


def test_siglip_loss_and_gradients(backend):
    img, txt = _features()
    module = vnn.SigLipLoss()
    loss = module(img, txt)
    loss.backward()
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    expected = reference.siglip_loss(img.double(), txt.double(), log_scale.exp(), bias)
    expected.backward()
    assert_close(loss.detach(), expected.detach(), name="loss")
    assert_close(module.logit_scale.grad, log_scale.grad, name="d logit_scale")
    assert_close(module.logit_bias.grad, bias.grad, name="d logit_bias")


def test_clip_scale_is_clamped_at_100():
    img, txt = _features()
    module = vnn.ClipLoss(init_logit_scale=math.log(400.0))
    assert module.scale().item() == pytest.approx(100.0)
    loss = module(img, txt)
    loss.backward()
    expected = reference.infonce_loss(img.double(), txt.double(), torch.tensor(100.0, dtype=torch.float64))
    assert_close(loss.detach(), expected, name="loss")
    # Past the clamp the temperature no longer learns (as when CLIP clamps it).
    assert module.logit_scale.grad.item() == 0.0


def test_features_get_gradients_and_training_lowers_the_loss():
    img, txt = _features(B=16, D=8, seed=3)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    module = vnn.SigLipLoss()
    optimiser = torch.optim.SGD([img, txt, *module.parameters()], lr=0.05)
    first = None
    for _ in range(10):
        optimiser.zero_grad()
        loss = module(img, txt)
        loss.backward()
        first = loss.item() if first is None else first
        optimiser.step()
    assert img.grad is not None and torch.isfinite(img.grad).all()
    assert module(img, txt).item() < first


def test_without_normalisation_uses_raw_features():
    img, txt = _features(B=7, D=5)
    img, txt = img / 5, txt / 5
    module = vnn.ClipLoss(init_logit_scale=0.0, normalize=False)
    expected = reference.infonce_loss(img.double(), txt.double(), torch.tensor(1.0, dtype=torch.float64), normalize=False)
    assert_close(module(img, txt).detach(), expected, name="loss")
    normalised = reference.infonce_loss(F.normalize(img.double()), F.normalize(txt.double()), torch.tensor(1.0, dtype=torch.float64), normalize=False)
    assert abs(module(img, txt).item() - normalised.item()) > 1e-3
