"""Tests of jaxvgg.augment against numpy references recomputed from the same random draws."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvgg import augment

RNG = np.random.default_rng(0)
BATCH_U8 = RNG.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)  # one shape for most tests: fewer compilations
BATCH_F32 = BATCH_U8.astype(np.float32) / 255.0
WIDE_U8 = RNG.integers(0, 256, (2, 37, 50, 3), dtype=np.uint8)  # non-square, odd height
KEY = jax.random.key(0)


def numpy_pad_crop(images: np.ndarray, offsets: np.ndarray, padding: int) -> np.ndarray:
    """Reference: zero-pad each side, crop (H, W) at each image's (top, left)."""
    _, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return np.stack([p[t : t + height, l : l + width] for p, (t, l) in zip(padded, offsets)])


# ---------------------------------------------------------------------------------------------
# value range


def test_to_float_maps_uint8_to_the_unit_interval_and_keeps_floats():
    out = augment.to_float(BATCH_U8)
    assert out.dtype == jnp.float32 and out.shape == BATCH_U8.shape
    np.testing.assert_allclose(np.asarray(out), BATCH_U8.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
    assert augment.to_float(BATCH_F32.astype(np.float16)).dtype == jnp.float32


def test_normalize_matches_the_totensor_then_normalize_formula_for_uint8_and_float():
    mean, std = np.float32(augment.CIFAR10_MEAN), np.float32(augment.CIFAR10_STD)
    expected = (BATCH_U8.astype(np.float32) / np.float32(255) - mean) / std
    got = np.asarray(augment.normalize(BATCH_U8, augment.CIFAR10_MEAN, augment.CIFAR10_STD))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    got_float = augment.normalize(jnp.asarray(BATCH_F32), augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    np.testing.assert_allclose(np.asarray(got_float), expected, rtol=1e-6, atol=1e-6)
    gray = BATCH_U8[..., :1]
    np.testing.assert_allclose(
        np.asarray(augment.normalize(gray, augment.MNIST_MEAN, augment.MNIST_STD)),
        (gray.astype(np.float32) / 255 - np.float32(0.1307)) / np.float32(0.3081),
        rtol=1e-6,
        atol=1e-6,
    )


def test_normalize_rejects_a_mean_of_the_wrong_length():
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        augment.normalize(BATCH_U8, augment.MNIST_MEAN, augment.MNIST_STD)


def test_eval_transform_is_normalize_and_cifar_train_transform_is_crop_flip_then_normalize():
    np.testing.assert_array_equal(
        np.asarray(augment.eval_transform(BATCH_U8, augment.HALF_MEAN, augment.HALF_STD)),
        np.asarray(augment.normalize(BATCH_U8, augment.HALF_MEAN, augment.HALF_STD)),
    )
    expected = augment.normalize(augment.random_crop_flip(KEY, BATCH_U8, 4), augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    got = augment.cifar_train_transform(KEY, BATCH_U8, augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    # same crops and flips; XLA fuses the normalisation differently inside one jit: 1-ulp differences
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# crop and flip


@pytest.mark.parametrize("images", [BATCH_U8, BATCH_F32], ids=["uint8", "float32"])
def test_random_crop_equals_a_numpy_pad_and_crop_at_the_drawn_offsets(images):
    out = augment.random_crop(KEY, images, padding=4)
    assert out.dtype == images.dtype and out.shape == images.shape
    offsets = np.asarray(augment.random_crop_offsets(KEY, len(images), 4))
    np.testing.assert_array_equal(np.asarray(out), numpy_pad_crop(images, offsets, 4))


def test_random_crop_offsets_cover_zero_to_twice_the_padding():
    offsets = np.asarray(augment.random_crop_offsets(KEY, 2000, 4))
    assert offsets.min() == 0 and offsets.max() == 8
    assert sorted(np.unique(offsets[:, 0]).tolist()) == list(range(9))
    assert np.unique(offsets[:, 1]).size == 9


def test_random_flip_mirrors_exactly_the_images_its_mask_selects():
    out = np.asarray(augment.random_flip(KEY, BATCH_U8))
    mask = np.asarray(augment.random_flip_mask(KEY, len(BATCH_U8)))
    assert 0 < mask.sum() < len(mask)  # this key flips some, keeps some
    np.testing.assert_array_equal(out, np.where(mask[:, None, None, None], BATCH_U8[:, :, ::-1], BATCH_U8))


def test_random_crop_flip_is_crop_then_flip_with_the_split_keys():
    crop_key, flip_key = jax.random.split(KEY)
    offsets = np.asarray(augment.random_crop_offsets(crop_key, len(BATCH_U8), 4))
    mask = np.asarray(augment.random_flip_mask(flip_key, len(BATCH_U8)))
    cropped = numpy_pad_crop(BATCH_U8, offsets, 4)
    expected = np.where(mask[:, None, None, None], cropped[:, :, ::-1], cropped)
    np.testing.assert_array_equal(np.asarray(augment.random_crop_flip(KEY, BATCH_U8, 4)), expected)


RANDOM_TRANSFORMS = {
    "random_crop": lambda key, x: augment.random_crop(key, x, 4),
    "random_flip": augment.random_flip,
    "random_crop_flip": lambda key, x: augment.random_crop_flip(key, x, 4),
    "scale_jitter_crop": lambda key, x: augment.scale_jitter_crop(key, x, crop=12, min_side=14, max_side=24),
    "pca_colour_shift": augment.pca_colour_shift,
    "random_resized_crop": lambda key, x: augment.random_resized_crop(key, x, 12),
    "random_rotation": lambda key, x: augment.random_rotation(key, x, 30.0),
    "color_jitter": lambda key, x: augment.color_jitter(key, x, brightness=0.4, contrast=0.4, saturation=0.4),
}


@pytest.mark.parametrize("name", sorted(RANDOM_TRANSFORMS))
def test_random_transforms_are_deterministic_per_key_and_differ_across_keys(name):
    transform = RANDOM_TRANSFORMS[name]
    first, again = transform(KEY, BATCH_U8), transform(KEY, BATCH_U8)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(transform(jax.random.key(1), BATCH_U8)))
    assert first.shape[0] == len(BATCH_U8) and first.shape[-1] == 3


# ---------------------------------------------------------------------------------------------
# resize and center crop (torchvision semantics)


def test_resize_scales_the_shorter_side_with_torchvision_truncation():
    assert augment.resized_hw((37, 50), 20) == (20, 27)  # int(20 * 50 / 37) = int(27.03)
    assert augment.resized_hw((50, 37), 64) == (86, 64)  # int(64 * 50 / 37) = int(86.49)
    assert augment.resized_hw((37, 50), (10, 11)) == (10, 11)
    out = augment.resize(WIDE_U8, 20)
    assert out.shape == (2, 20, 27, 3) and out.dtype == jnp.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 255.0  # input value range, not [0, 1]


def test_center_crop_uses_torchvisions_rounding_of_the_offsets():
    assert augment.center_crop_offsets((37, 50), (16, 16)) == (10, 17)  # int(round(10.5)) = 10, as torchvision
    assert augment.center_crop_offsets((39, 50), (16, 20)) == (12, 15)  # round(11.5) = 12
    out = augment.center_crop(WIDE_U8, 16)
    assert out.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(out), WIDE_U8[:, 10:26, 17:33])
    with pytest.raises(ValueError, match="center crop 40x40 is larger than the 37x50 image"):
        augment.center_crop(WIDE_U8, 40)


def test_resize_center_crop_is_resize_then_center_crop():
    out = np.asarray(augment.resize_center_crop(WIDE_U8, resize=20, crop=16))
    resized = np.asarray(augment.resize(WIDE_U8, 20))  # (2, 20, 27, 3)
    top, left = augment.center_crop_offsets((20, 27), (16, 16))
    assert (top, left) == (2, 6)  # round(2.0), round(5.5) = 6
    np.testing.assert_array_equal(out, resized[:, top : top + 16, left : left + 16])


def test_resize_center_crop_matches_torchvision_resize_and_center_crop_values():
    torch = pytest.importorskip("torch", reason="optional value check against torchvision")
    v2 = pytest.importorskip("torchvision.transforms.v2", reason="optional value check against torchvision")
    out = np.asarray(augment.resize_center_crop(WIDE_U8, resize=20, crop=16))
    pipeline = v2.Compose([v2.Resize(20, antialias=True), v2.CenterCrop(16)])
    reference = pipeline(torch.from_numpy(WIDE_U8).permute(0, 3, 1, 2).float()).permute(0, 2, 3, 1).numpy()
    # tolerance 1e-3 on the 0-255 scale; max abs difference seen: 4.6e-5 (float32 rounding only)
    max_diff = np.abs(out - reference).max()
    assert max_diff < 1e-3, f"max abs difference to torchvision {max_diff}"


# ---------------------------------------------------------------------------------------------
# VGG augmentation


# jitted so each reference size compiles once instead of op by op
reference_resize = jax.jit(functools.partial(jax.image.resize, method="linear"), static_argnums=1)


def test_scale_jitter_crop_equals_resizing_to_its_drawn_size_then_cropping():
    out = np.asarray(augment.scale_jitter_crop(KEY, WIDE_U8, crop=12, min_side=14, max_side=24))
    assert out.shape == (2, 12, 12, 3) and out.dtype == np.float32
    sizes, offsets = map(np.asarray, augment.scale_jitter_params(KEY, 2, (37, 50), 12, 14, 24))
    for image, (new_h, new_w), (top, left), crop in zip(WIDE_U8, sizes, offsets, out):
        assert 14 <= new_h <= 24 and new_w == int(new_h * 50 / 37)  # shorter side S, aspect kept
        resized = np.asarray(reference_resize(image.astype(np.float32), (int(new_h), int(new_w), 3)))
        np.testing.assert_allclose(crop, resized[top : top + 12, left : left + 12], rtol=0, atol=1e-3)


def test_scale_jitter_crop_with_the_side_fixed_at_the_crop_is_a_random_crop_of_the_resized_image():
    out = np.asarray(augment.scale_jitter_crop(KEY, WIDE_U8, crop=20, min_side=20, max_side=20))
    resized = np.asarray(augment.resize(WIDE_U8, 20))  # (2, 20, 27, 3)
    sizes, offsets = map(np.asarray, augment.scale_jitter_params(KEY, 2, (37, 50), 20, 20, 20))
    assert sizes.tolist() == [[20, 27]] * 2 and offsets[:, 0].tolist() == [0, 0]
    expected = np.stack([r[:, left : left + 20] for r, left in zip(resized, offsets[:, 1])])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-3)


def test_pca_colour_shift_adds_one_constant_per_image_and_channel():
    out = np.asarray(augment.pca_colour_shift(KEY, BATCH_F32, std=0.1))
    shift = out - BATCH_F32
    per_image = shift[:, 0, 0, :]  # (B, 3)
    np.testing.assert_allclose(shift, np.broadcast_to(per_image[:, None, None, :], shift.shape), atol=1e-6)
    np.testing.assert_allclose(per_image, np.asarray(augment.pca_colour_offsets(KEY, len(BATCH_F32))), atol=1e-6)
    assert np.unique(per_image[:, 0].round(6)).size == len(BATCH_F32)  # a different shift for every image
    # the shift lies in the span of the eigenvectors weighted by alpha * eigval: recover alpha and check its scale
    alpha = np.linalg.solve(np.float32(augment.IMAGENET_EIGVEC), per_image.T).T / np.float32(augment.IMAGENET_EIGVAL)
    assert np.abs(alpha).max() < 0.5  # N(0, 0.1) draws
    np.testing.assert_allclose(np.asarray(augment.pca_colour_shift(KEY, BATCH_F32, std=0.0)), BATCH_F32)


# ---------------------------------------------------------------------------------------------
# transfer-learning transforms


def test_random_resized_crop_boxes_fit_and_the_whole_square_image_is_a_plain_resize():
    boxes = np.asarray(augment.random_resized_crop_params(KEY, 500, (37, 50)))
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (height > 0).all() and (width > 0).all()
    assert (top + height <= 37).all() and (left + width <= 50).all()
    area = height * width / (37 * 50)
    assert area.min() >= 0.07 and area.max() <= 1.0
    square = BATCH_U8
    whole = augment.random_resized_crop(KEY, square, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(np.asarray(whole), np.asarray(augment.resize(square, (12, 12))), atol=1e-3)


def test_random_resized_crop_falls_back_to_the_centred_box_of_the_nearest_ratio():
    # area 1 at ratio 2 never fits a square 16x16 image: torchvision falls back to w=16, h=round(16/2), centred
    boxes = np.asarray(augment.random_resized_crop_params(KEY, 4, (16, 16), scale=(1.0, 1.0), ratio=(2.0, 2.0)))
    assert boxes.tolist() == [[4, 0, 8, 16]] * 4


def test_random_rotation_by_90_degrees_is_numpy_rot90_and_by_0_is_the_identity():
    out = augment.random_rotation(KEY, BATCH_U8, (90.0, 90.0))
    assert out.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(out), np.rot90(BATCH_U8, k=1, axes=(1, 2)))  # counter-clockwise
    np.testing.assert_array_equal(np.asarray(augment.random_rotation(KEY, BATCH_U8, 0.0)), BATCH_U8)
    tilted = np.asarray(augment.random_rotation(KEY, BATCH_U8 | 1, (45.0, 45.0)))  # every input pixel non-zero
    assert (tilted[:, 0, 0] == 0).all() and (tilted[:, 8, 8] != 0).all()  # corners filled with 0


def test_color_jitter_brightness_scales_each_image_by_one_factor_and_hue_is_not_implemented():
    images = 0.1 + 0.4 * BATCH_F32  # in [0.1, 0.5]: a factor in [0.5, 1.5] never clips
    out = np.asarray(augment.color_jitter(KEY, images, brightness=0.5))
    ratio = out / images
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1, :1], ratio.shape), rtol=1e-5)
    assert 0.5 <= ratio.min() and ratio.max() <= 1.5 and np.unique(ratio[:, 0, 0, 0].round(5)).size > 1
    with pytest.raises(NotImplementedError, match="hue"):
        augment.color_jitter(KEY, images, hue=0.1)


def test_color_jitter_saturation_leaves_grey_images_grey_and_all_outputs_stay_in_the_unit_interval():
    grey = np.repeat(BATCH_F32[..., :1], 3, axis=-1)
    out = np.asarray(augment.color_jitter(KEY, grey, saturation=0.9))
    np.testing.assert_allclose(out, grey, atol=1e-3)  # torchvision's grey weights sum to 0.9999
    jittered = np.asarray(augment.color_jitter(KEY, BATCH_U8, brightness=0.8, contrast=0.8, saturation=0.8))
    assert jittered.dtype == np.float32 and jittered.min() >= 0.0 and jittered.max() <= 1.0


def test_translate_moves_the_content_with_zeros_coming_in_and_the_tta_views_weigh_to_one():
    x = (np.arange(2 * 5 * 6, dtype=np.uint8).reshape(2, 5, 6, 1) + 1)
    expected = np.zeros_like(x)
    expected[:, 2:, :-1] = x[:, :-2, 1:]  # 2 rows down, 1 column left
    np.testing.assert_array_equal(augment.translate(jnp.asarray(x), 2, -1), expected)
    np.testing.assert_array_equal(augment.flip(jnp.asarray(x)), x[:, :, ::-1])
    for level, count in ((0, 1), (1, 2), (2, 6)):
        views = augment.tta_views(level)
        assert len(views) == count and sum(w for w, _ in views) == pytest.approx(1.0)
    weights, views = zip(*augment.tta_views(2))
    assert weights == (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)
    up_left = np.zeros_like(x)
    up_left[:, :-2, :-2] = x[:, 2:, 2:]
    np.testing.assert_array_equal(views[2](jnp.asarray(x)), up_left)
    np.testing.assert_array_equal(views[4](jnp.asarray(x)), up_left[:, :, ::-1])  # mirrored after the move
    with pytest.raises(ValueError, match=r"tta level must be one of \(0, 1, 2\), got 3"):
        augment.tta_views(3)
