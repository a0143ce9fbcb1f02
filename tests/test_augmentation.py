"""Patch augmentations: explicit-generator determinism, each operation's effect, config validation."""

import pytest
import torch
from augmentation_reference import OPERATIONS, per_image_reference

from hlss_hf.data.augmentation import (
    AUGMENTATION_PRESETS,
    DEFAULT_AUGMENTATION,
    HLSS_REFERENCE_AUGMENTATION,
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
    reference = torch.stack([per_image_reference(augment, image, generator=g) for image in images])
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
        ("hlss_paper", "hlss_paper"),
        ({"solarize": {}, "resize": {}}, "resize"),
        ({"resize": {"p": 0.5}}, "resize.p"),
        ({"resize": {"interpolation": "lanczos"}}, "resize.interpolation"),
        ({"resize": {"antialias": "no"}}, "resize.antialias must be true or false"),
        ({"affine": {"interpolation": "bicubic"}}, "affine.interpolation"),
        (["solarize"], "preset name or a dict"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        build_augmentation(config, 16)


def test_every_operation_is_configurable_and_can_be_disabled():
    for name in OPERATION_DEFAULTS:
        if name == "resize":
            continue  # not random: p must stay 1 (tested with the bad configs)
        assert name in build_augmentation({name: {}}, 8).operations
        assert name not in build_augmentation({name: False}, 8).operations
    with pytest.raises(TypeError, match="float"):
        build_augmentation(None, 8)(torch.zeros(3, 8, 8, dtype=torch.uint8))


# --- fast path vs the per-image reference path --------------------------------------------------------------


def single_op_configs():
    return [{name: {"p": 1.0}} for name in OPERATION_DEFAULTS] + [
        "hlss_reference",
        {name: {**params, "p": 1.0} for name, params in HLSS_REFERENCE_AUGMENTATION.items()},
        {"resize": {"interpolation": "bilinear"}, "vertical_flip": {"p": 1.0}, "solarize": {"p": 1.0}},
        {"resize": {}, "solarize": {"p": 1.0}, "horizontal_flip": {"p": 1.0}},  # a flip after another op
        {"affine": {"p": 1.0, "interpolation": "nearest", "round_translate": True, "translate": 0.3}},
        {"color_jitter": {"p": 1.0, "hue": 0.5}},  # the whole hue circle
        {"solarize": {"p": 1.0, "threshold": 0.0}},
        {"solarize": {"p": 1.0, "threshold": 1.0}},
        {name: {"p": 1.0} for name in OPERATION_DEFAULTS},
        None,
    ]


@pytest.mark.parametrize(
    "config",
    single_op_configs(),
    ids=lambda c: "default" if c is None else c if isinstance(c, str) else "+".join(c)[:40],
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
        reference = torch.stack(
            [per_image_reference(augment, image, generator=reference_gen) for image in images]
        )
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
        # Both consumed exactly the same draws.
        assert torch.equal(torch.rand(4, generator=fast_gen), torch.rand(4, generator=reference_gen))
    single = augment(images[0], generator=gen(1))
    torch.testing.assert_close(
        single, per_image_reference(augment, images[0], generator=gen(1)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "crop, size",
    [((300, 300), (224, 224)), ((134, 150), (224, 224)), ((224, 224), (224, 224)), ((600, 250), (224, 224)),
     ((1, 1), (8, 8)), ((9, 30), (7, 12)), ((1000, 17), (224, 5))],
)  # fmt: skip
@pytest.mark.parametrize("mode, antialias", [("bilinear", True), ("bicubic", True), ("bicubic", False)])
def test_banded_resize_equals_interpolate_with_flips_folded_in(crop, size, mode, antialias):
    # The fast path's crop resize (banded weight matrices, flips as reversed rows) against F.interpolate, on a
    # strided crop as the fast path passes it: shrinking, enlarging, unchanged, non-square, extreme ratios.
    import torch.nn.functional as F

    from hlss_hf.data.augmentation import resize_into

    height, width = crop
    image = torch.rand(3, height + 5, width + 7, generator=gen(height))[:, 2 : 2 + height, 3 : 3 + width]
    expected = F.interpolate(image[None], size=size, mode=mode, align_corners=False, antialias=antialias)[0]
    for flips in ([], [-1], [-2], [-2, -1]):
        out = torch.empty(3, *size)
        resize_into(image, flips, out, mode, antialias)
        # Bicubic taps sum up to ~1.4 in magnitude: twice the bilinear rounding.
        atol = 1e-6 if mode == "bilinear" else 2e-6
        torch.testing.assert_close(out, expected.flip(flips) if flips else expected, atol=atol, rtol=0)


def test_fast_hue_rotation_matches_kornia_on_ties_greys_and_pure_colours():
    from kornia.enhance import adjust_hue

    from hlss_hf.data.augmentation import hue_shift

    levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
    grid = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, 8, 8)  # every tie pattern
    images = torch.cat([grid, torch.rand(3, 3, 8, 8, generator=gen(2))])
    for shift in (-0.5, -0.3, -0.05, 0.0, 0.01, 0.25, 0.5):
        shifts = torch.full((len(images),), shift)
        expected = adjust_hue(images, shift * 2 * torch.pi)
        torch.testing.assert_close(hue_shift(images, shifts), expected, atol=2e-6, rtol=0)


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


# --- the reference's chain as a preset ----------------------------------------------------------------------


@pytest.fixture
def one_thread():
    # Thousands of small-tensor calls: with several intra-op threads on a busy machine each call can wait on
    # the thread pool for milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hlss_reference_preset_pins_the_reference_chain():
    # What the HLSS code runs (hlss/common.py get_dataloaders -> improc.get_srh_aug_list(augs) with its default
    # rand_prob=0.5, over the train_augmentation list of train_hlss_attr3levels.yaml): the order, every p, every
    # range; the first resize without antialiasing, as torchvision 0.16.2 resizes tensors.
    augment = build_augmentation("hlss_reference", 224)
    assert augment.resize_first and augment.crop_size == 224
    assert augment.operations == {
        "resize": {"p": 1.0, "interpolation": "bicubic", "antialias": False},
        "horizontal_flip": {"p": 0.5},
        "vertical_flip": {"p": 0.5},
        "gaussian_noise": {"p": 0.5, "std": (0.01, 0.1)},
        # no color_jitter: the reference's ColorJitter() has no ranges, a no-op
        "autocontrast": {"p": 0.5},
        "solarize": {"p": 0.5, "threshold": 0.2},
        "sharpness": {"p": 0.5, "factor": 2.0},
        "gaussian_blur": {"p": 0.5, "kernel_size": 5, "sigma": (1.0, 1.0)},
        "affine": {
            "p": 0.5,
            "degrees": (-10.0, 10.0),
            "translate": (0.1, 0.3),
            "scale": (1.0, 1.0),
            "shear": (0.0, 0.0),
            "interpolation": "nearest",
            "round_translate": True,
        },
        "random_resized_crop": {"p": 0.5, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
        "random_erasing": {"p": 0.5, "scale": (0.02, 0.33), "ratio": (0.3, 3.3), "value": 0.0},
    }
    assert list(augment.operations) == list(HLSS_REFERENCE_AUGMENTATION)  # dict order is application order
    # Today's set stays available by name, and is still the default.
    assert set(AUGMENTATION_PRESETS) == {"hlss_hf", "hlss_reference"}
    assert build_augmentation("hlss_hf", 224).operations == build_augmentation(None, 224).operations
    image = torch.rand(3, 40, 40, generator=gen(1))
    assert torch.equal(
        build_augmentation("hlss_hf", 24)(image, gen(3)), build_augmentation(None, 24)(image, gen(3))
    )


def test_hlss_reference_is_deterministic_from_the_generator_for_srh_and_he_patches():
    import numpy as np

    from hlss_hf.models.hlss.pixels_hlss import he_to_float, srh_to_float

    rng = np.random.default_rng(0)
    # docs/method.md, preprocessing: [3, H, W]
    srh = srh_to_float(rng.integers(2000, 30000, size=(2, 30, 30), dtype=np.uint16))
    he = he_to_float(rng.integers(0, 256, size=(30, 30, 3), dtype=np.uint8))
    augment = build_augmentation("hlss_reference", 16)
    for image in (srh, he):
        assert image.shape == (3, 30, 30)
        torch.manual_seed(0)
        first = augment(image, generator=gen(5))
        torch.manual_seed(1)  # the global RNG plays no part
        assert first.shape == (3, 16, 16) and torch.equal(first, augment(image, generator=gen(5)))
        assert not torch.equal(first, augment(image, generator=gen(6)))
        g1, g2 = gen(2), gen(2)
        torch.testing.assert_close(
            augment.batch([image] * 4, generator=g1),
            torch.stack([per_image_reference(augment, image, generator=g2) for _ in range(4)]),
            atol=1e-5,
            rtol=0,
        )


def test_each_hlss_reference_operation_equals_torchvision_with_fixed_parameters():
    # Each operation of the preset, run by both of our paths with fixed parameters, against torchvision's
    # functional op with the same parameters (what the reference's transforms call).
    tv = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    from hlss_hf.data.augmentation import affine_matrix

    size = 24
    augment = build_augmentation("hlss_reference", size)
    image = torch.rand(3, size, size, generator=gen(0))
    # Quantised pixels (exact solarize thresholds) and values above 1 / below 0, as after the bicubic resize.
    quantised = (torch.rand(3, size, size, generator=gen(1)) * 10).floor() / 8 - 0.05
    noise = torch.randn(3, size, size, generator=gen(2))
    cases = [
        ("horizontal_flip", {}, image, tv.hflip(image)),
        ("vertical_flip", {}, image, tv.vflip(image)),
        ("gaussian_noise", {"sigma": 0.07, "noise": noise}, image, (image + noise * 0.07).clamp(0, 1)),
        ("autocontrast", {}, quantised, tv.autocontrast(quantised)),
        ("solarize", {"threshold": 0.2}, quantised.clamp(0, 1), tv.solarize(quantised.clamp(0, 1), 0.2)),
        # Out-of-range border pixels too: torchvision's blend clamps them although the blur leaves them alone.
        ("sharpness", {"factor": 2.0}, quantised, tv.adjust_sharpness(quantised, 2.0)),
        (
            "gaussian_blur",
            {"kernel_size": 5, "sigma": 1.0},
            image,
            tv.gaussian_blur(image, [5, 5], [1.0, 1.0]),
        ),
        (
            "random_resized_crop",
            {"box": (3, 5, 9, 14)},
            image,
            tv.resized_crop(image, 3, 5, 9, 14, [size, size]),
        ),
        (
            "random_erasing",
            {"box": (2, 4, 7, 5), "value": 0.0},
            image,
            tv.erase(image, 2, 4, 7, 5, torch.tensor(0.0)),
        ),
    ]
    for angle, translate in ((7.3, (2, -5)), (-9.6, (0, 7)), (0.0, (-3, 1))):
        theta = affine_matrix(angle, translate, 1.0, 0.0, torch.float32)
        expected = tv.affine(
            image, angle, list(translate), 1.0, [0.0, 0.0], InterpolationMode.NEAREST, fill=[0.0] * 3
        )
        cases.append(("affine", {"theta": theta, "mode": "nearest"}, image, expected))
    for name, args, source, expected in cases:
        reference = OPERATIONS[name](augment, source.clone(), **args)
        fast = source.clone()
        getattr(augment, f"_fast_{name}")(fast, **args)
        if name == "affine":
            # Nearest neighbours: our grid equals torchvision's to float rounding, so a pixel may pick its
            # neighbour only at an exact tie; none occur here.
            assert torch.equal(reference, expected) and torch.equal(fast, expected), name
        else:
            torch.testing.assert_close(reference, expected, atol=2e-6, rtol=0, msg=name)
            torch.testing.assert_close(fast, expected, atol=2e-6, rtol=0, msg=name)
    # The first step: the whole patch resized with torchvision's Resize (bicubic, not clamped), without
    # antialiasing in the preset, with it in a resize of our own.
    patch = torch.rand(3, 37, 31, generator=gen(4))
    for antialias in (augment.operations["resize"]["antialias"], True):
        resize_only = build_augmentation({"resize": {"antialias": antialias}}, size)
        expected = tv.resize(patch, [size, size], InterpolationMode.BICUBIC, antialias=antialias)
        assert float(expected.max()) > 1.0 or float(expected.min()) < 0.0  # it does overshoot
        torch.testing.assert_close(resize_only(patch, generator=gen()), expected, atol=2e-6, rtol=0)
        torch.testing.assert_close(
            per_image_reference(resize_only, patch, generator=gen()), expected, atol=2e-6, rtol=0
        )


def test_hlss_reference_resizes_the_patch_as_torchvision_0_16_resizes_tensors():
    # The reference pins torchvision 0.16.2, whose Resize does not antialias tensors: the preset's 300 -> 224 step
    # equals torchvision's functional resize with antialias=False, on both paths and for views sharing a patch;
    # our own resize op keeps antialiasing (torchvision >= 0.17's default).
    tv = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    patch = torch.rand(3, 300, 300, generator=gen(7))
    plain = tv.resize(patch, [224, 224], InterpolationMode.BICUBIC, antialias=False)
    smooth = tv.resize(patch, [224, 224], InterpolationMode.BICUBIC, antialias=True)
    assert float((plain - smooth).abs().mean()) > 0.01  # far apart on a textured patch
    preset = build_augmentation({"resize": HLSS_REFERENCE_AUGMENTATION["resize"]}, 224)
    torch.testing.assert_close(preset(patch, generator=gen()), plain, atol=2e-6, rtol=0)
    torch.testing.assert_close(per_image_reference(preset, patch, generator=gen()), plain, atol=2e-6, rtol=0)
    torch.testing.assert_close(
        preset.batch([patch, patch], generator=gen()), torch.stack([plain] * 2), atol=2e-6, rtol=0
    )
    ours = build_augmentation({"resize": {}}, 224)
    torch.testing.assert_close(ours(patch, generator=gen()), smooth, atol=2e-6, rtol=0)


def test_hlss_reference_draws_follow_the_reference_distributions(one_thread):
    # The preset's draws against torchvision's own parameter samplers (the ones the reference's transforms call).
    stats = pytest.importorskip("scipy.stats")
    transforms = pytest.importorskip("torchvision.transforms")
    size, trials = 224, 2000
    augment = build_augmentation("hlss_reference", size)
    g = gen(0)
    counts = dict.fromkeys(augment.operations, 0)
    drawn = {"gaussian_noise": [], "affine": [], "random_resized_crop": [], "random_erasing": []}
    for _ in range(trials):
        plan = augment._draw(300, 300, 3, torch.float32, g)
        assert plan.crop == (0, 0, 300, 300)  # always the whole patch first
        counts["resize"] += 1
        for name, args in plan.ops:
            counts[name] += 1
            if name in drawn:
                drawn[name].append(args)
    for name, count in counts.items():
        p = augment.operations[name]["p"]
        assert abs(count / trials - p) <= 4 * (p * (1 - p) / trials) ** 0.5 + 1e-9, (name, count / trials, p)

    def same(ours, theirs, name):
        assert stats.ks_2samp(ours, theirs).pvalue > 1e-3, name

    # Noise: std ~ U(0.01, 0.1), standard normal noise of the view's shape.
    sigmas = [args["sigma"] for args in drawn["gaussian_noise"]]
    assert stats.kstest(sigmas, stats.uniform(0.01, 0.09).cdf).pvalue > 1e-3
    noise = torch.stack([args["noise"] for args in drawn["gaussian_noise"][:20]])
    assert (
        noise.shape[1:] == (3, size, size)
        and abs(float(noise.mean())) < 0.01
        and abs(float(noise.std()) - 1) < 0.01
    )
    # Affine: RandomAffine(10, translate=(0.1, 0.3)).get_params, compared through the inverse map it implies.
    theirs = [
        transforms.RandomAffine.get_params((-10.0, 10.0), (0.1, 0.3), None, None, [size, size])
        for _ in range(2000)
    ]
    thetas = torch.stack([args["theta"] for args in drawn["affine"]]).double()
    angles = torch.rad2deg(torch.atan2(-thetas[:, 0, 1], thetas[:, 0, 0]))
    moves = -torch.linalg.solve(thetas[:, :, :2], thetas[:, :, 2:])[..., 0]  # the forward translation
    assert torch.allclose(moves, moves.round(), atol=1e-4)  # whole pixels
    assert {args["mode"] for args in drawn["affine"]} == {"nearest"}
    same(angles.tolist(), [t[0] for t in theirs], "affine angle")
    same(moves[:, 0].tolist(), [t[1][0] for t in theirs], "affine tx")
    same(moves[:, 1].tolist(), [t[1][1] for t in theirs], "affine ty")
    # The late crop: RandomResizedCrop(224).get_params on the 224 px image.
    crops = [args["box"] for args in drawn["random_resized_crop"]]
    theirs = [
        transforms.RandomResizedCrop.get_params(torch.empty(3, size, size), [0.08, 1.0], [3 / 4, 4 / 3])
        for _ in range(2000)
    ]
    for k, what in enumerate(("top", "left", "height", "width")):
        same([c[k] for c in crops], [t[k] for t in theirs], f"crop {what}")
    # Erasing: RandomErasing().get_params on the 224 px view.
    boxes = [args["box"] for args in drawn["random_erasing"]]
    assert None not in boxes
    theirs = [
        transforms.RandomErasing.get_params(torch.empty(3, size, size), (0.02, 0.33), (0.3, 3.3), [0.0])[:4]
        for _ in range(2000)
    ]
    for k, what in enumerate(("top", "left", "height", "width")):
        same([b[k] for b in boxes], [t[k] for t in theirs], f"erasing {what}")


def test_hlss_reference_outputs_match_the_torchvision_pipeline_in_distribution(one_thread):
    # End to end: the preset's views of one patch and the reference's torchvision chain's views of it (drawing
    # from the global RNGs, as the reference does) have the same distribution of per-view statistics.
    stats = pytest.importorskip("scipy.stats")
    pytest.importorskip("torchvision")
    import random

    from augmentation_reference import torchvision_reference_transform

    size, views = 32, 500
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    patch = torch.stack(
        [0.2 + 0.6 * xx, 0.3 + 0.4 * yy * xx, 0.5 + 0.3 * torch.sin(6 * xx * yy)]
    )  # asymmetric
    ours = build_augmentation("hlss_reference", size).batch([patch] * views, generator=gen(0))
    torch.manual_seed(0)
    random.seed(0)
    reference = torchvision_reference_transform(size)
    theirs = torch.stack([reference(patch) for _ in range(views)])

    def summaries(batch):
        left, top = batch[..., : size // 2].mean((1, 2, 3)), batch[..., : size // 2, :].mean((1, 2, 3))
        return {
            "mean": batch.mean((1, 2, 3)),
            "std": batch.std((1, 2, 3)),
            "zeros": (batch == 0).float().mean((1, 2, 3)),  # erasing, affine borders, solarize/noise clamps
            "ones": (batch == 1).float().mean((1, 2, 3)),
            "left - right": 2 * left - batch.mean((1, 2, 3)),  # horizontal flips
            "top - bottom": 2 * top - batch.mean((1, 2, 3)),  # vertical flips
            "red - blue": batch[:, 0].mean((1, 2)) - batch[:, 2].mean((1, 2)),
            "roughness": (batch[..., 1:] - batch[..., :-1]).abs().mean((1, 2, 3)),  # noise, blur, sharpness
        }

    for name, ours_values in summaries(ours).items():
        theirs_values = summaries(theirs)[name]
        assert stats.ks_2samp(ours_values.numpy(), theirs_values.numpy()).pvalue > 1e-3, name
