"""Models Genesis's restorative pretext (Zhou et al., MICCAI 2019; MedIA 2021): the autoencoder restores a
slice from one that is locally shuffled, mapped through a random intensity curve and in- or out-painted,
so it must learn texture, intensity and the shape of the anatomy rather than copy. The transformations
and their rates follow the official `generate_pair` (MrGiovanni/ModelsGenesis, pytorch/utils.py) on 2D
slices, without its flips; each image's are applied alike to all its channels (CT windows x neighbour
slices), so the channels stay one anatomy.
"""
from __future__ import annotations

import torch

__all__ = ['RATES', 'genesis']

RATES = dict(local=.5, nonlinear=.9, paint=.9, outpaint=.8)     # the official rates, `genesis`'s defaults
_DRAWS = 40          # scalar draws per image, more than the transformations can take (at most 36)


def genesis(x: torch.Tensor, generator=None, nonlinear: float = RATES['nonlinear'], local: float = RATES['local'],
            paint: float = RATES['paint'], outpaint: float = RATES['outpaint']):
    """Each image of `x` [B, C, H, W] in [0, 1] transformed as Models Genesis does, each step with its own
    probability, in the official order: local pixel shuffling (`local`), a non-linear intensity curve
    (`nonlinear`), then painting (`paint`): out-painting with probability `outpaint`, else in-painting.
    The default rates are the official ones. Returns (transformed [B, C, H, W], mask [B, 1, H, W] of ones:
    every pixel is scored), the contract of `pretraining.corrupt`."""
    B, _, H, W = x.shape
    draws = torch.rand(B, _DRAWS, generator=generator, device=x.device).tolist()     # one device sync per batch
    out = x.clone()
    for i in range(B):
        rand = iter(draws[i]).__next__
        if rand() < local: out[i] = _shuffle_tiles(out[i], rand, generator)
        if rand() < nonlinear: out[i] = _intensity_curve(out[i], rand)
        if rand() < paint: out[i] = _outpaint(out[i], rand, generator) if rand() < outpaint else _inpaint(out[i], rand, generator)
    return out.clamp_(0, 1), torch.ones(B, 1, H, W, dtype=x.dtype, device=x.device)


def _randint(rand, lo: int, hi: int) -> int:
    "Uniform in lo..hi inclusive, as `random.randint`."
    return lo + min(int(rand() * (hi - lo + 1)), hi - lo)


def _intensity_curve(img, rand, n: int = 1000):
    """The pixels mapped by a cubic Bezier curve from (0, 0) to (1, 1) through two random control points,
    linearly interpolated between `n` points of it. With probability 0.5 only the curve's x values are
    sorted, which pairs them with y values running from 1 down to 0: an inverted, not always monotonic
    mapping, as in the original; otherwise both are sorted, a monotonic one."""
    p1, p2, x_only = (rand(), rand()), (rand(), rand()), rand() < .5
    t = torch.linspace(0, 1, n, device=img.device)
    # the original's Bernstein order: (1, 1) at t = 0, (0, 0) at t = 1
    b1, b2, b3 = 3 * t ** 2 * (1 - t), 3 * t * (1 - t) ** 2, (1 - t) ** 3
    xs, ys = b1 * p1[0] + b2 * p2[0] + b3, (b1 * p1[1] + b2 * p2[1] + b3).clamp(0, 1)
    xs = xs.sort().values
    if not x_only: ys = ys.sort().values
    v = img.float().reshape(-1)
    j = torch.searchsorted(xs, v).clamp(1, n - 1)
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    w = ((v - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0, 1)
    return (y0 + w * (y1 - y0)).reshape(img.shape).to(img.dtype)


def _shuffle_tiles(img, rand, generator):
    """Local pixel shuffling: the pixels of a random share of the tiles of a grid of side b (2 to a tenth
    of the image) permuted within their tile, one permutation for every channel. A tile grid rather than
    the original's 10,000 overlapping random blocks, so that it is a few tensor operations; the share is
    drawn in [0.5, 1], since those blocks cover most of an image. The rows and columns past the last
    whole tile stay as they are."""
    C, H, W = img.shape
    b = _randint(rand, 2, max(2, min(H, W) // 10))
    share, gh, gw = .5 + rand() / 2, H // b, W // b
    if not gh or not gw: return img
    keys = torch.rand(gh, gw, b * b, generator=generator, device=img.device)
    chosen = torch.rand(gh, gw, 1, generator=generator, device=img.device) < share
    keys = torch.where(chosen, keys, torch.arange(b * b, device=img.device, dtype=keys.dtype))   # unchosen tiles: sorted, unmoved
    perm = keys.argsort(-1).expand(C, gh, gw, b * b)
    tiles = img[:, :gh * b, :gw * b].reshape(C, gh, b, gw, b).permute(0, 1, 3, 2, 4).reshape(C, gh, gw, b * b)
    tiles = tiles.gather(-1, perm).reshape(C, gh, gw, b, b).permute(0, 1, 3, 2, 4).reshape(C, gh * b, gw * b)
    out = img.clone()
    out[:, :gh * b, :gw * b] = tiles
    return out


def _box(rand, H: int, W: int, side_h: int, side_w: int):
    "Rows and columns of a box of the given sides, 3 pixels clear of the border where the image allows, as in the original."
    mh, mw = min(3, (H - side_h) // 2), min(3, (W - side_w) // 2)
    top, left = _randint(rand, mh, H - side_h - mh), _randint(rand, mw, W - side_w - mw)
    return slice(top, top + side_h), slice(left, left + side_w)


def _noise(img, generator):
    "Uniform noise [H, W], the same for every channel."
    return torch.rand(img.shape[1:], generator=generator, device=img.device, dtype=img.dtype)


def _inpaint(img, rand, generator):
    "Up to 5 boxes of sides 1/6 to 1/3 of the image filled with uniform noise, each further box with probability 0.95."
    _, H, W = img.shape
    out, noise = img.clone(), _noise(img, generator)
    for _ in range(5):
        if rand() >= .95: break
        rows, cols = _box(rand, H, W, _randint(rand, H // 6, H // 3), _randint(rand, W // 6, W // 3))
        out[:, rows, cols] = noise[rows, cols]
    return out


def _outpaint(img, rand, generator):
    """The image replaced by uniform noise, then a box of sides 3/7 to 4/7 of it copied back from the
    original, and up to 4 more, each further box with probability 0.95."""
    _, H, W = img.shape
    out = _noise(img, generator).expand_as(img).clone()
    for k in range(5):
        if k and rand() >= .95: break
        rows, cols = _box(rand, H, W, H - _randint(rand, 3 * H // 7, 4 * H // 7), W - _randint(rand, 3 * W // 7, 4 * W // 7))
        out[:, rows, cols] = img[:, rows, cols]
    return out
