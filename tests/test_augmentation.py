"""Patch augmentations: explicit-generator determinism, each operation's effect, config validation."""

import pytest
import torch

from hlss_hf.augmentation import (
    DEFAULT_AUGMENTATION,
    OPERATION_DEFAULTS,
    build_augmentation,
    build_eval_transform,
    center_crop_resize,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ramp(size=16):
    # Distinct values everywhere so that flips and crops are visible; channels differ too.
    base = torch.arange(size * size, dtype=torch.float32).reshape(size, size) / (size * size)
    return torch.stack([base, base.flip(-1), 1 - base])


def only(name, crop=16, **params):
    """A chain with just ``name`` at p=1 and no random crop (a 16x16 input passes the centre crop unchanged)."""
    return build_augmentation({name: {"p": 1.0, **params}}, crop)


def test_default_chain_is_deterministic_given_the_generator():
    augment = build_augmentation(None, 24)
    image = torch.rand(3, 40, 40, generator=gen(1))
    first = augment(image, generator=gen(7))
    assert first.shape == (3, 24, 24)
    assert torch.equal(first, augment(image, generator=gen(7)))
    assert not torch.equal(first, augment(image, generator=gen(8)))
    # The global RNG plays no part.
    torch.manual_seed(0)
    a = augment(image, generator=gen(7))
    torch.manual_seed(1)
    assert torch.equal(a, augment(image, generator=gen(7)))
    assert set(augment.operations) == set(DEFAULT_AUGMENTATION)


def test_batch_input_draws_per_image_and_matches_sequential_calls():
    augment = build_augmentation(None, 16)
    images = torch.rand(3, 3, 20, 20, generator=gen(2))
    batch = augment(images, generator=gen(5))
    g = gen(5)
    sequential = torch.stack([augment(image, generator=g) for image in images])
    assert batch.shape == (3, 3, 16, 16) and torch.equal(batch, sequential)
    g = gen(5)
    reference = torch.stack([augment.reference(image, generator=g) for image in images])
    torch.testing.assert_close(batch, reference, atol=1e-5, rtol=0)
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0


def test_flips_at_p1_flip_and_at_p0_do_nothing():
    image = ramp()
    assert torch.equal(only("horizontal_flip")(image, generator=gen()), image.flip(-1))
    assert torch.equal(only("vertical_flip")(image, generator=gen()), image.flip(-2))
    assert torch.equal(build_augmentation({"horizontal_flip": {"p": 0.0}}, 16)(image, generator=gen()), image)


def test_solarize_inverts_pixels_above_the_threshold():
    image = torch.tensor([[0.1, 0.29], [0.31, 0.9]]).expand(3, 2, 2)
    out = only("solarize", crop=2, threshold=0.3)(image, generator=gen())
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.29], [0.69, 0.1]]).expand(3, 2, 2))


def test_random_erasing_zeroes_one_rectangle():
    image = torch.full((3, 16, 16), 0.5)
    out = only("random_erasing", scale=[0.1, 0.2])(image, generator=gen(3))
    erased = out[0] == 0
    assert 0.1 * 256 * 0.5 <= int(erased.sum()) <= 0.2 * 256 * 1.5
    rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
    box = erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert bool(box.all())  # one filled rectangle
    assert torch.equal(out[:, ~erased], image[:, ~erased])


def test_gaussian_noise_perturbs_with_the_requested_scale():
    image = torch.full((3, 16, 16), 0.5)
    out = only("gaussian_noise", std=[0.05, 0.05])(image, generator=gen())
    assert (out - image).std().item() == pytest.approx(0.05, rel=0.2)


def test_blur_smooths_and_sharpness_sharpens():
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2
    image = checker.float().expand(3, 16, 16).clone() * 0.5 + 0.25
    blurred = only("gaussian_blur", sigma=[1.0, 1.0])(image, generator=gen())
    assert blurred.std() < 0.5 * image.std()
    soft = blurred.clone()
    sharpened = only("sharpness", factor=3.0)(soft, generator=gen())
    assert sharpened[:, 1:-1, 1:-1].std() > soft[:, 1:-1, 1:-1].std()
    torch.testing.assert_close(only("sharpness", factor=1.0)(soft, generator=gen()), soft)


def test_autocontrast_stretches_each_channel_to_full_range():
    image = ramp() * 0.5 + 0.2
    out = only("autocontrast")(image, generator=gen())
    torch.testing.assert_close(out.amin(dim=(1, 2)), torch.zeros(3))
    torch.testing.assert_close(out.amax(dim=(1, 2)), torch.ones(3))


def test_color_jitter_changes_colours_and_identity_factors_do_not():
    image = ramp() * 0.8 + 0.1
    out = only("color_jitter", brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2)(image, generator=gen(4))
    assert not torch.allclose(out, image)
    same = only("color_jitter", brightness=0, contrast=0, saturation=0, hue=0)(image, generator=gen(4))
    torch.testing.assert_close(same, image)


def test_affine_identity_and_rotation():
    image = ramp()
    identity = only("affine", degrees=0, translate=0, scale=1.0, shear=0)(image, generator=gen())
    torch.testing.assert_close(identity, image, atol=1e-5, rtol=0)
    rotated = only("affine", degrees=[90, 90], translate=0, scale=1.0, shear=0)(image, generator=gen())
    # A quarter turn of a square image is a transpose-and-flip (sign depends on the image axis convention).
    assert any(torch.allclose(rotated, torch.rot90(image, k, dims=(1, 2)), atol=1e-4) for k in (1, -1))


def test_random_resized_crop_and_eval_transform_sizes():
    image = torch.rand(3, 30, 40, generator=gen())
    crop = build_augmentation({"random_resized_crop": {"scale": [0.3, 0.6]}}, 12)(image, generator=gen())
    assert crop.shape == (3, 12, 12)
    evaluate = build_eval_transform(20)
    assert evaluate.operations == {}
    torch.testing.assert_close(evaluate(image), image[:, 5:25, 10:30])
    assert center_crop_resize(torch.rand(3, 8, 10), 16).shape == (3, 16, 16)  # smaller input is resized first


def test_default_output_stays_in_unit_range():
    augment = build_augmentation(None, 16)
    out = augment(torch.rand(8, 3, 24, 24, generator=gen()), generator=gen(1))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"random_flip": {}}, "random_flip"),
        ({"solarize": {"p": 1.5}}, "solarize.p"),
        ({"gaussian_blur": {"p": -0.1}}, "gaussian_blur.p"),
        ({"solarize": {"thresh": 0.1}}, "solarize.thresh"),
        ({"gaussian_blur": {"kernel_size": 4}}, "kernel_size"),
        ({"color_jitter": {"brightness": [0.9, 0.1]}}, "color_jitter.brightness"),
        ({"bogus": False}, "bogus"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        build_augmentation(config, 16)


def test_every_operation_is_configurable_and_can_be_disabled():
    for name in OPERATION_DEFAULTS:
        assert name in build_augmentation({name: {}}, 8).operations
        assert name not in build_augmentation({name: False}, 8).operations
    with pytest.raises(TypeError, match="float"):
        build_augmentation(None, 8)(torch.zeros(3, 8, 8, dtype=torch.uint8))


# --- fast path vs the per-image reference path --------------------------------------------------------------


def single_op_configs():
    return [{name: {"p": 1.0}} for name in OPERATION_DEFAULTS] + [
        {"color_jitter": {"p": 1.0, "hue": 0.5}},  # the whole hue circle
        {"solarize": {"p": 1.0, "threshold": 0.0}},
        {"solarize": {"p": 1.0, "threshold": 1.0}},
        {name: {"p": 1.0} for name in OPERATION_DEFAULTS},
        None,
    ]


@pytest.mark.parametrize(
    "config", single_op_configs(), ids=lambda c: "default" if c is None else "+".join(c)[:40]
)
def test_fast_path_equals_the_reference_path_on_the_same_draws(config):
    # Mixed sizes (the crop draws depend on them), quantised pixels (ties between channels, exact thresholds)
    # and a flat channel (autocontrast leaves it).
    augment = build_augmentation(config, 12)
    images = [torch.rand(3, 16 + 2 * i, 14 + i, generator=gen(i)) for i in range(5)]
    images.append((torch.rand(3, 16, 16, generator=gen(9)) * 8).floor() / 8)
    images.append(torch.cat([torch.full((1, 12, 12), 0.4), torch.rand(2, 12, 12, generator=gen(3))]))
    for seed in range(4):
        fast_gen, reference_gen = gen(seed), gen(seed)
        fast = augment.batch(images, generator=fast_gen)
        reference = torch.stack([augment.reference(image, generator=reference_gen) for image in images])
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
        # Both consumed exactly the same draws.
        assert torch.equal(torch.rand(4, generator=fast_gen), torch.rand(4, generator=reference_gen))
    single = augment(images[0], generator=gen(1))
    torch.testing.assert_close(single, augment.reference(images[0], generator=gen(1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "crop, size",
    [((300, 300), (224, 224)), ((134, 150), (224, 224)), ((224, 224), (224, 224)), ((600, 250), (224, 224)),
     ((1, 1), (8, 8)), ((9, 30), (7, 12)), ((1000, 17), (224, 5))],
)  # fmt: skip
def test_banded_resize_equals_antialiased_interpolate_with_flips_folded_in(crop, size):
    # The fast path's crop resize (banded weight matrices, flips as reversed rows) against F.interpolate, on a
    # strided crop as the fast path passes it: shrinking, enlarging, unchanged, non-square, extreme ratios.
    import torch.nn.functional as F

    from hlss_hf.augmentation import _resize_into

    height, width = crop
    image = torch.rand(3, height + 5, width + 7, generator=gen(height))[:, 2 : 2 + height, 3 : 3 + width]
    expected = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    for flips in ([], [-1], [-2], [-2, -1]):
        out = torch.empty(3, *size)
        _resize_into(image, flips, out)
        torch.testing.assert_close(out, expected.flip(flips) if flips else expected, atol=1e-6, rtol=0)


def test_fast_hue_rotation_matches_kornia_on_ties_greys_and_pure_colours():
    from kornia.enhance import adjust_hue

    from hlss_hf.augmentation import _hue_shift

    levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
    grid = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, 8, 8)  # every tie pattern
    images = torch.cat([grid, torch.rand(3, 3, 8, 8, generator=gen(2))])
    for shift in (-0.5, -0.3, -0.05, 0.0, 0.01, 0.25, 0.5):
        shifts = torch.full((len(images),), shift)
        expected = adjust_hue(images, shift * 2 * torch.pi)
        torch.testing.assert_close(_hue_shift(images, shifts), expected, atol=2e-6, rtol=0)


def test_each_operation_is_drawn_with_its_probability():
    # The draws (shared by both paths) apply each operation with its configured probability, per image.
    augment = build_augmentation(None, 8)
    g = gen(0)
    counts = dict.fromkeys(augment.operations, 0)
    trials = 3000
    for _ in range(trials):
        plan = augment._draw(16, 16, 3, torch.float32, g)
        counts["random_resized_crop"] += plan.crop is not None
        for name, _ in plan.ops:
            counts[name] += 1
    for name, count in counts.items():
        p = augment.operations[name]["p"]
        assert abs(count / trials - p) <= 4 * (p * (1 - p) / trials) ** 0.5 + 1e-9, (name, count / trials, p)
