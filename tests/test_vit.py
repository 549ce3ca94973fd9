"""Vision transformers: gradient, perturbation and surrogate methods as they are; CAMs on the token
map reshaped to the patch grid, checked against Grad-CAM computed by hand from plain hooks.

The small ViTs are made here: a patch embedding (a strided conv, or unfold + Linear), a class
token or none (mean of the tokens), register tokens, position embeddings, two pre-norm attention
blocks (nn.MultiheadAttention or hand-written attention), a final norm and a linear head.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import single_thread
from torch import nn

import counterlens as cl
from counterlens.attribution import METHODS, find_target_layer, gradcam
from counterlens.errors import MethodError

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


class HandAttention(nn.Module):
    """Multi-head self-attention written out (qkv in one Linear), returning a tensor."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim, heads, hand):
        super().__init__()
        self.hand = hand
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads) if hand else nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + (self.attn(h) if self.hand else self.attn(h, h, h, need_weights=False)[0])
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, size=(16, 16), patch=4, dim=16, classes=3, cls_token=True, registers=0, hand=False,
                 unfold=False):
        super().__init__()
        self.patch, self.unfold = patch, unfold
        grid = (size[0] // patch, size[1] // patch)
        self.patch_embed = nn.Linear(patch * patch, dim) if unfold else nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5) if cls_token else None
        self.registers = nn.Parameter(torch.randn(1, registers, dim) * 0.5) if registers else None
        extra = int(cls_token) + registers
        self.pos = nn.Parameter(torch.randn(1, extra + grid[0] * grid[1], dim) * 0.5)
        self.blocks = nn.Sequential(Block(dim, 2, hand), Block(dim, 2, hand))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        if self.unfold:
            t = self.patch_embed(F.unfold(x, self.patch, stride=self.patch).transpose(1, 2))
        else:
            t = self.patch_embed(x).flatten(2).transpose(1, 2)
        lead = [p.expand(x.shape[0], -1, -1) for p in (self.cls_token, self.registers) if p is not None]
        t = torch.cat([*lead, t], dim=1) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0] if self.cls_token is not None else t.mean(dim=1))


def vit_clf(seed=0, **kw):
    torch.manual_seed(seed)
    return cl.Classifier(ViT(**kw).eval(), device="cpu")


def hand_gradcam(clf, x, target, layer: nn.Module, extra: int, grid, relu=True):
    """Grad-CAM from plain hooks: tokens [1, N, D] -> drop ``extra`` -> [D, h, w] -> weights, ReLU, bilinear."""
    out = []
    for i in range(x.shape[0]):
        store = {}
        handle = layer.register_forward_hook(lambda m, inp, o: store.__setitem__("a", o))
        try:
            logits = clf.module(x[i:i + 1])
        finally:
            handle.remove()
        a = store["a"]
        (g,) = torch.autograd.grad(logits[0, target[i]], a)
        a = a[0, extra:].T.reshape(-1, *grid)
        g = g[0, extra:].T.reshape(-1, *grid)
        cam = (g.mean(dim=(1, 2), keepdim=True) * a).sum(0)
        cam = cam.clamp_min(0) if relu else cam
        out.append(F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out).detach()


@pytest.fixture
def x():
    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("hand", [False, True])
def test_gradcam_on_a_vit_equals_the_hand_computation(x, hand):
    clf = vit_clf(hand=hand)
    assert find_target_layer(clf, x) == "blocks.1.norm1"     # the last block's norm before attention
    target = clf.predict(x)
    ours = gradcam(clf, x, target)
    ref = hand_gradcam(clf, x, target, clf.module.blocks[1].norm1, extra=1, grid=(4, 4))
    assert ref.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw, extra, grid, layer", [
    ({"registers": 4}, 5, (4, 4), "blocks.1.norm1"),                     # class token + 4 registers
    ({"cls_token": False}, 0, (4, 4), "norm"),                          # mean of the tokens: the last norm
    ({"size": (16, 24)}, 1, (4, 6), "blocks.1.norm1"),                  # a non-square grid from the patch embedding
    ({"cls_token": False, "registers": 2, "hand": True}, 2, (4, 4), "norm"),
])
def test_vit_layouts_find_their_grid_and_layer(kw, extra, grid, layer):
    clf = vit_clf(**kw)
    x = torch.rand(2, 1, *kw.get("size", (16, 16)), generator=torch.Generator().manual_seed(2))
    assert find_target_layer(clf, x) == layer
    target = clf.predict(x)
    ref = hand_gradcam(clf, x, target, dict(clf.module.named_modules())[layer], extra=extra, grid=grid, relu=False)
    assert ref.abs().amax() > 0
    torch.testing.assert_close(gradcam(clf, x, target, relu=False), ref, rtol=1e-4, atol=1e-6)
    # the same layer named, with the grid and the extra tokens said explicitly
    torch.testing.assert_close(gradcam(clf, x, target, layer=layer, reshape=grid, tokens=extra, relu=False), ref,
                               rtol=1e-4, atol=1e-6)


def test_every_cam_method_runs_on_a_vit(x):
    clf = vit_clf(registers=1)
    for name in ("gradcam", "gradcam_plus_plus", "layercam", "scorecam", "guided_gradcam"):
        m = METHODS[name].function(clf, x, "predicted")
        assert m.shape == (3, 16, 16) and torch.isfinite(m).all() and m.abs().amax() > 0, name


def test_gradient_perturbation_and_surrogate_methods_work_as_is(x):
    clf = vit_clf()
    target = clf.predict(x)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(clf.module(xg).gather(1, target[:, None]).sum(), xg)
    torch.testing.assert_close(METHODS["saliency"].function(clf, x, target), g.abs().amax(1))
    attr, delta = METHODS["integrated_gradients"].function(clf, x, target, steps=32, return_delta=True)
    assert delta.abs().max() < 1e-2 * clf.logits(x).abs().max()             # completeness
    params = {"smoothgrad": {"samples": 4}, "occlusion": {"window": 4, "stride": 4}, "rise": {"samples": 64},
              "lime": {"samples": 64, "segmentation": "grid", "n_segments": 16},
              "kernel_shap": {"samples": 64, "segmentation": "grid", "n_segments": 16}}
    for name, p in params.items():
        m = METHODS[name].function(clf, x, target, **p)
        assert m.shape == (3, 16, 16) and torch.isfinite(m).all() and m.abs().amax() > 0, name


def test_token_maps_without_a_patch_embedding_map_use_a_square_or_reshape():
    clf = vit_clf(unfold=True)                    # patches by unfold + Linear: no [B, D, h, w] anywhere
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    target = clf.predict(x)
    ref = hand_gradcam(clf, x, target, clf.module.blocks[1].norm1, extra=1, grid=(4, 4))
    torch.testing.assert_close(gradcam(clf, x, target), ref, rtol=1e-4, atol=1e-6)   # 17 = 1 + 4 x 4

    wide = vit_clf(unfold=True, size=(16, 24))   # 25 tokens: 1 + 24 patches, 24 not a square
    xw = torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(3))
    tw = wide.predict(xw)
    with pytest.raises(MethodError, match=r"reshape="):
        gradcam(wide, xw, tw, layer="blocks.1.norm1", tokens=1)
    ref = hand_gradcam(wide, xw, tw, wide.module.blocks[1].norm1, extra=1, grid=(4, 6))
    torch.testing.assert_close(gradcam(wide, xw, tw, layer="blocks.1.norm1", reshape=(4, 6)), ref,
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(MethodError, match=r"not the 20 patches"):
        gradcam(wide, xw, tw, layer="blocks.1.norm1", reshape=(4, 5), tokens=1)


def test_a_cam_on_a_layer_without_a_map_says_so(x):
    clf = vit_clf()
    with pytest.raises(MethodError, match=r"'head' returns shape \(1, 3\)|'head' returns shape \(3, 3\)"):
        gradcam(clf, x, "predicted", layer="head")


@pytest.mark.parametrize("kind", ["traced", "export"])
def test_cams_on_an_exported_vit_equal_the_eager_vit(tmp_path, kind):
    from counterlens.loading import load_model
    clf = vit_clf(hand=True, registers=1)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    if kind == "traced":
        path = tmp_path / "vit.pt"
        torch.jit.trace(clf.module, x, check_trace=False).save(str(path))
    else:
        path = tmp_path / "vit.pt2"
        torch.export.save(torch.export.export(clf.module, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                          str(path))
    exported = load_model(path, device="cpu")
    target = clf.predict(x)
    for name in ("gradcam", "layercam"):
        kwargs = {"relu": False} if name == "gradcam" else {}
        ref = METHODS[name].function(clf, x, target, **kwargs)
        assert ref.abs().amax() > 0
        torch.testing.assert_close(METHODS[name].function(exported, x, target, **kwargs), ref, rtol=1e-4, atol=1e-6)
