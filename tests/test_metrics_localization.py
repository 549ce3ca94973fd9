"""Localisation metrics: closed forms, a naive per-image reference, edge cases, 1D/2D/3D."""
import math

import numpy as np
import pytest
import torch

from counterlens.errors import InputError
from counterlens.metrics.localization import (
    expected_in_top,
    mass_lift,
    pointing_game,
    relevance_mass,
    relevance_rank,
)

SHAPES = [(40,), (12, 16), (6, 7, 8)]


def _masks(shape, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(batch, *shape, generator=g) < 0.3
    m.view(batch, -1)[:, 0] = True            # never empty
    return m


# -- closed forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_map_equal_to_mask(shape):
    masks = _masks(shape)
    maps = masks.float()
    share = masks.flatten(1).double().mean(1)
    assert torch.equal(pointing_game(maps, masks), torch.ones(3))
    torch.testing.assert_close(relevance_mass(maps, masks), torch.ones(3))
    torch.testing.assert_close(relevance_rank(maps, masks), torch.ones(3))
    torch.testing.assert_close(mass_lift(maps, masks), (1 / share).float())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_uniform_map_scores_chance(shape):
    masks = _masks(shape)
    maps = torch.full(masks.shape, 0.7)
    share = masks.flatten(1).double().mean(1).float()
    torch.testing.assert_close(mass_lift(maps, masks), torch.ones(3))
    torch.testing.assert_close(relevance_mass(maps, masks), share)
    torch.testing.assert_close(relevance_rank(maps, masks), share)     # ties count in expectation
    torch.testing.assert_close(pointing_game(maps, masks), share)


def test_map_avoiding_the_mask_scores_zero():
    masks = _masks((10, 10))
    maps = (~masks).float()
    assert torch.equal(pointing_game(maps, masks), torch.zeros(3))
    assert torch.equal(relevance_mass(maps, masks), torch.zeros(3))
    assert torch.equal(relevance_rank(maps, masks), torch.zeros(3))
    assert torch.equal(mass_lift(maps, masks), torch.zeros(3))


def test_negative_relevance_is_ignored_by_mass_but_ranks_low():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2] = True                       # top half, share 0.5
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 3.0                       # inside
    maps[0, 3, 3] = 1.0                       # outside
    maps[0, 1] = -10.0                        # strongly negative, inside
    torch.testing.assert_close(relevance_mass(maps, masks), torch.tensor([0.75]))
    torch.testing.assert_close(mass_lift(maps, masks), torch.tensor([1.5]))
    # top-8 (K = mask size): 3.0 (in), 1.0 (out), then 6 slots among 10 tied zeros, 3 of them in the
    # mask (row 0 but its first pixel), 7 out (rows 2-3 but the last pixel); the -10s rank last
    expected = (1 + 6 * 3 / 10) / 8
    torch.testing.assert_close(relevance_rank(maps, masks), torch.tensor([expected]))


# -- against a naive per-image numpy loop ---------------------------------------------------------
def _naive(maps: np.ndarray, masks: np.ndarray, tolerance: int):
    out = {"pointing": [], "mass": [], "rank": [], "lift": []}
    for m, k in zip(maps, masks):
        peak = np.array(np.unravel_index(np.argmax(m), m.shape))
        inside = np.argwhere(k)
        out["pointing"].append(float(np.sqrt(((inside - peak) ** 2).sum(1)).min() <= tolerance))
        pos = np.clip(m, 0, None)
        mass = pos[k].sum() / pos.sum()
        out["mass"].append(mass)
        order = np.argsort(-m.ravel())[: k.sum()]
        out["rank"].append(k.ravel()[order].mean())
        out["lift"].append(mass / k.mean())
    return {key: torch.tensor(v, dtype=torch.float32) for key, v in out.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("tolerance", [0, 1, 3])
def test_matches_a_naive_loop(shape, tolerance):
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(6, *shape, generator=g)          # continuous values: no ties
    masks = _masks(shape, batch=6, seed=2)
    ref = _naive(maps.numpy(), masks.numpy(), tolerance)
    torch.testing.assert_close(pointing_game(maps, masks, tolerance=tolerance), ref["pointing"])
    torch.testing.assert_close(relevance_mass(maps, masks), ref["mass"])
    torch.testing.assert_close(relevance_rank(maps, masks), ref["rank"])
    torch.testing.assert_close(mass_lift(maps, masks), ref["lift"])


def test_pointing_tolerance_is_a_euclidean_ball():
    masks = torch.zeros(3, 21, 21, dtype=torch.bool)
    masks[:, 10, 10] = True
    maps = torch.zeros(3, 21, 21)
    maps[0, 10, 13] = 1        # distance 3
    maps[1, 12, 12] = 1        # distance sqrt(8) ~ 2.83
    maps[2, 13, 12] = 1        # distance sqrt(13) ~ 3.61
    assert pointing_game(maps, masks, tolerance=3).tolist() == [1.0, 1.0, 0.0]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [0.0, 0.0, 0.0]
    assert pointing_game(maps, masks).tolist() == [0.0, 0.0, 0.0]


def test_pointing_ties_count_in_expectation():
    masks = torch.zeros(1, 10, dtype=torch.bool)
    masks[0, :2] = True
    maps = torch.zeros(1, 10)
    maps[0, [0, 5, 6, 7]] = 1.0               # four tied maxima, one in the mask
    assert pointing_game(maps, masks).item() == pytest.approx(0.25)


# -- edge cases and input handling ----------------------------------------------------------------
def test_empty_mask_is_nan_and_zero_map_has_no_mass():
    masks = _masks((8, 8), batch=2)
    masks[1] = False
    maps = torch.rand(2, 8, 8)
    for fn in (pointing_game, relevance_mass, relevance_rank, mass_lift):
        out = fn(maps, masks)
        assert not math.isnan(out[0]) and math.isnan(out[1]), fn.__name__
    zero = torch.zeros(2, 8, 8)
    m = _masks((8, 8), batch=2)
    assert torch.isnan(relevance_mass(zero, m)).all() and torch.isnan(mass_lift(zero, m)).all()
    assert torch.isnan(relevance_mass(-torch.rand(2, 8, 8), m)).all()    # only negative relevance
    share = m.flatten(1).float().mean(1)
    torch.testing.assert_close(pointing_game(zero, m), share)           # no information: chance level
    torch.testing.assert_close(relevance_rank(zero, m), share)


def test_inputs_numpy_shared_mask_int_and_float_masks():
    maps = torch.rand(4, 6, 6)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:3] = True
    expected = relevance_mass(maps, mask.expand(4, 6, 6))
    torch.testing.assert_close(relevance_mass(maps, mask), expected)                   # one mask for all
    torch.testing.assert_close(relevance_mass(maps.numpy(), mask.numpy()), expected)   # numpy
    torch.testing.assert_close(relevance_mass(maps, mask.int()), expected)             # 0/1 ints
    torch.testing.assert_close(relevance_mass(maps, mask.float() * 0.9), expected)     # float > 0.5
    assert relevance_mass(maps, mask).dtype == torch.float32 and relevance_mass(maps, mask).device.type == "cpu"


def test_errors_name_the_argument():
    with pytest.raises(InputError, match="masks has shape"):
        relevance_mass(torch.rand(2, 5, 5), torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="NaN"):
        mass_lift(torch.full((1, 3, 3), float("nan")), torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="tolerance"):
        pointing_game(torch.rand(1, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool), tolerance=-1)
    with pytest.raises(InputError, match=r"\[batch, \*spatial\]"):
        relevance_rank(torch.rand(5), torch.ones(5, dtype=torch.bool))


def test_expected_in_top_counts_ties_in_proportion():
    m = torch.tensor([[5.0, 1.0, 1.0, 1.0, 0.0]])
    k = torch.tensor([[False, True, False, False, True]])
    # top 2: 5.0 (out) plus one of three tied 1.0s, one of which is in the mask
    assert expected_in_top(m.double(), k, torch.tensor([2])).item() == pytest.approx(1 / 3)
    assert expected_in_top(m.double(), k, torch.tensor([0])).item() == 0
    assert expected_in_top(m.double(), k, torch.tensor([5])).item() == pytest.approx(2)
