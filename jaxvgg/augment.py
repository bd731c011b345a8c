"""Per-batch image transforms in JAX, run on the device after the host gathers a uint8 batch.

Every function takes and returns NHWC batches and is pure and jitted (sizes are static
arguments), so it can also be called inside a jitted train step. Random transforms take a
``jax.random`` key first and draw one set of parameters per image; the draws are public
(``random_crop_offsets``, ``random_flip_mask``, ``scale_jitter_params``, ...) so tests and
debugging can recompute exactly what a transform did.

    images = random_crop_flip(key, batch["image"], padding=4)        # torchvision RandomCrop(32, 4) + flip
    images = normalize(images, CIFAR10_MEAN, CIFAR10_STD)            # ToTensor + Normalize
    images = resize_center_crop(batch["image"], resize=256, crop=224)  # Resize(256) + CenterCrop(224)

Value ranges: ``to_float``/``normalize`` map uint8 to [0, 1] exactly as torchvision's ToTensor.
Geometric resampling (``resize``, ``scale_jitter_crop``, ``random_resized_crop``) returns float32 in
the input's value range; crops, flips and rotations keep the dtype. Colour transforms work on
floats in [0, 1] and map uint8 input there first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

HALF_MEAN = (0.5, 0.5, 0.5)  # transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) of the tutorials
HALF_STD = (0.5, 0.5, 0.5)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

# PCA of ImageNet RGB pixels in [0, 1] (AlexNet's "colour shift"); values from fb.resnet.torch
# datasets/imagenet.lua `pca`. Columns of IMAGENET_EIGVEC are the eigenvectors.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as (height, width); an int means a square."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return int(height), int(width)


def _uniform_int(uniform: jax.Array, count) -> jax.Array:
    """Map uniform [0, 1) draws to integers uniform over [0, count) (count may be a per-element array)."""
    return jnp.minimum(jnp.floor(uniform * count).astype(jnp.int32), jnp.asarray(count, jnp.int32) - 1)


def _check_nhwc(images, name: str = "images"):
    """Raise unless ``images`` is a rank-4 (B, H, W, C) batch."""
    if images.ndim != 4:
        raise ValueError(f"{name} must be a (B, H, W, C) batch, got shape {images.shape}")


# ---------------------------------------------------------------------------------------------
# Value range


@jax.jit
def to_float(images: jax.Array) -> jax.Array:
    """uint8 -> float32 in [0, 1] (``x / 255``, as torchvision ToTensor); float input is cast to float32.

    Args:
        images: uint8 or float batch.

    Returns:
        float32 batch of the same shape.
    """
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(jnp.float32)
    raise TypeError(f"images must be uint8 or float, got {images.dtype}")


@jax.jit
def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(x / 255 - mean) / std`` per channel, the order of operations of ToTensor + Normalize.

    Args:
        images: uint8 (B, H, W, C), or float already in [0, 1].
        mean: C per-channel means.
        std: C per-channel standard deviations.

    Returns:
        float32 batch of the same shape.
    """
    _check_nhwc(images)
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
        raise ValueError(f"mean and std need {images.shape[-1]} values (one per channel), got {mean} and {std}")
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (to_float(images) - mean) / std


# ---------------------------------------------------------------------------------------------
# CIFAR-style crop and flip


@functools.partial(jax.jit, static_argnames=("batch_size", "padding"))
def random_crop_offsets(key: jax.Array, batch_size: int, padding: int) -> jax.Array:
    """Per-image (top, left) crop offsets into the padded image, each uniform in [0, 2 * padding].

    Args:
        key: PRNG key.
        batch_size: B.
        padding: zero padding on each side.

    Returns:
        int32 (B, 2).
    """
    return _uniform_int(jax.random.uniform(key, (batch_size, 2)), 2 * padding + 1)


@functools.partial(jax.jit, static_argnames=("padding",))
def pad_and_crop(images: jax.Array, offsets: jax.Array, padding: int) -> jax.Array:
    """Zero-pad each side by ``padding``, then crop each image back to (H, W) at its (top, left) offset.

    Args:
        images: (B, H, W, C), any dtype.
        offsets: int (B, 2) offsets into the padded image, each in [0, 2 * padding].
        padding: zero padding on each side.

    Returns:
        (B, H, W, C), the input's dtype.
    """
    _check_nhwc(images)
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop_one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop_one)(padded, offsets)


@functools.partial(jax.jit, static_argnames=("padding",))
def random_crop(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """torchvision ``RandomCrop(size=(H, W), padding=padding)``: zero-pad, crop at a random offset per image.

    Args:
        key: PRNG key (offsets are ``random_crop_offsets(key, B, padding)``).
        images: (B, H, W, C), uint8 or float.
        padding: zero padding on each side.

    Returns:
        (B, H, W, C), the input's dtype.
    """
    return pad_and_crop(images, random_crop_offsets(key, images.shape[0], padding), padding)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def random_flip_mask(key: jax.Array, batch_size: int) -> jax.Array:
    """Per-image flip decisions, True with probability 0.5.

    Args:
        key: PRNG key.
        batch_size: B.

    Returns:
        bool (B,).
    """
    return jax.random.bernoulli(key, 0.5, (batch_size,))


@jax.jit
def flip_where(images: jax.Array, mask: jax.Array) -> jax.Array:
    """Mirror (left-right) the images whose ``mask`` entry is True.

    Args:
        images: (B, H, W, C).
        mask: bool (B,).

    Returns:
        (B, H, W, C), the input's dtype.
    """
    _check_nhwc(images)
    return jnp.where(mask[:, None, None, None], images[:, :, ::-1, :], images)


@jax.jit
def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """torchvision ``RandomHorizontalFlip(p=0.5)``, decided per image.

    Args:
        key: PRNG key (decisions are ``random_flip_mask(key, B)``).
        images: (B, H, W, C).

    Returns:
        (B, H, W, C), the input's dtype.
    """
    return flip_where(images, random_flip_mask(key, images.shape[0]))


@functools.partial(jax.jit, static_argnames=("padding",))
def random_crop_flip(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """``random_crop`` then ``random_flip``, with keys ``jax.random.split(key)`` in that order.

    Args:
        key: PRNG key.
        images: (B, H, W, C).
        padding: zero padding on each side for the crop.

    Returns:
        (B, H, W, C), the input's dtype.
    """
    crop_key, flip_key = jax.random.split(key)
    return random_flip(flip_key, random_crop(crop_key, images, padding))


# ---------------------------------------------------------------------------------------------
# Deterministic resize and crop (torchvision Resize / CenterCrop semantics)


def resized_hw(image_hw: tuple[int, int], size: int | Sequence[int]) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (height, width): an int scales the shorter side to it.

    Args:
        image_hw: input (height, width).
        size: int for the shorter side (the longer one keeps the aspect ratio, truncated with ``int``
            as torchvision does), or (height, width).

    Returns:
        Output (height, width).
    """
    if not isinstance(size, int):
        return _pair(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    height, width = image_hw
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop_offsets(image_hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[int, int]:
    """torchvision CenterCrop's (top, left): ``int(round((h - crop) / 2.0))`` per axis.

    Args:
        image_hw: input (height, width).
        crop_hw: crop (height, width), no larger than the input.

    Returns:
        (top, left).
    """
    (height, width), (crop_h, crop_w) = image_hw, crop_hw
    if crop_h > height or crop_w > width:
        raise ValueError(f"center crop {crop_h}x{crop_w} is larger than the {height}x{width} image")
    return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))


@functools.partial(jax.jit, static_argnames=("size",))
def resize(images: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """Bilinear resize with torchvision ``Resize(size)`` output sizes (antialiased when shrinking).

    Args:
        images: (B, H, W, C), uint8 or float.
        size: int for the shorter side (aspect ratio kept), or (height, width).

    Returns:
        float32 (B, h, w, C) in the input's value range (uint8 input gives [0, 255]).
    """
    _check_nhwc(images)
    batch, height, width, channels = images.shape
    new_h, new_w = resized_hw((height, width), size)
    return jax.image.resize(
        images.astype(jnp.float32), (batch, new_h, new_w, channels), method="linear", antialias=True
    )


_resize = resize  # resize_center_crop's `resize` argument shadows the function


@functools.partial(jax.jit, static_argnames=("size",))
def center_crop(images: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """torchvision ``CenterCrop(size)`` (offsets from ``center_crop_offsets``; no padding: size <= image).

    Args:
        images: (B, H, W, C), any dtype.
        size: int for a square, or (height, width).

    Returns:
        (B, h, w, C), the input's dtype.
    """
    _check_nhwc(images)
    crop_h, crop_w = _pair(size)
    top, left = center_crop_offsets(images.shape[1:3], (crop_h, crop_w))
    return images[:, top : top + crop_h, left : left + crop_w, :]


@functools.partial(jax.jit, static_argnames=("resize", "crop"))
def resize_center_crop(images: jax.Array, resize: int = 256, crop: int = 224) -> jax.Array:
    """torchvision ``Compose([Resize(resize), CenterCrop(crop)])``: the ImageNet evaluation transform.

    Args:
        images: (B, H, W, C), uint8 or float.
        resize: shorter side after resizing.
        crop: side of the square center crop.

    Returns:
        float32 (B, crop, crop, C) in the input's value range.
    """
    return center_crop(_resize(images, resize), crop)


# ---------------------------------------------------------------------------------------------
# VGG / AlexNet training augmentation


@functools.partial(jax.jit, static_argnames=("batch_size", "image_hw", "crop", "min_side", "max_side"))
def scale_jitter_params(
    key: jax.Array, batch_size: int, image_hw: tuple[int, int], crop: int, min_side: int, max_side: int
) -> tuple[jax.Array, jax.Array]:
    """Per-image rescaled size and crop offset of ``scale_jitter_crop``.

    S is uniform over the integers [min_side, max_side]; the shorter side becomes S and the longer
    one ``(S * long) // short`` (torchvision Resize truncation); the crop offset is uniform over the
    valid positions of the rescaled image.

    Args:
        key: PRNG key.
        batch_size: B.
        image_hw: input (height, width).
        crop: crop side, <= min_side.
        min_side: smallest S.
        max_side: largest S.

    Returns:
        (rescaled (height, width) int32 (B, 2), crop (top, left) int32 (B, 2)).
    """
    if not crop <= min_side <= max_side:
        raise ValueError(f"need crop <= min_side <= max_side, got crop={crop} min_side={min_side} max_side={max_side}")
    height, width = image_hw
    short, long = min(height, width), max(height, width)
    draws = jax.random.uniform(key, (batch_size, 3))  # one PRNG call: S, top, left
    new_short = min_side + _uniform_int(draws[:, 0], max_side - min_side + 1)
    new_long = (new_short * long) // short  # exact integer floor, as torchvision's int(S * long / short)
    new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
    top = _uniform_int(draws[:, 1], new_h - crop + 1)
    left = _uniform_int(draws[:, 2], new_w - crop + 1)
    return jnp.stack([new_h, new_w], axis=1), jnp.stack([top, left], axis=1)


def _resample_windows(images: jax.Array, scales: jax.Array, offsets: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Per image, the out_hw window at ``offsets`` of the image rescaled by ``scales`` (never materialised)."""
    channels = images.shape[-1]

    def one(image, scale, offset):
        # scale_and_translate maps input coordinate x to x * scale + translation: the rescaled
        # image shifted so that the window's top-left pixel lands on output (0, 0)
        return jax.image.scale_and_translate(
            image, (*out_hw, channels), (0, 1), scale, -offset, method="linear", antialias=True
        )

    return jax.vmap(one)(images.astype(jnp.float32), scales, offsets.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("crop", "min_side", "max_side"))
def scale_jitter_crop(
    key: jax.Array, images: jax.Array, crop: int = 224, min_side: int = 256, max_side: int = 512
) -> jax.Array:
    """VGG's multi-scale training crop: rescale the shorter side to S ~ U[min_side, max_side], take a random crop.

    The rescaled image is never built: each crop is resampled straight from the input with
    ``jax.image.scale_and_translate`` at that image's scale and offset, which equals a bilinear
    (antialiased) resize to the rescaled size followed by the crop.

    Args:
        key: PRNG key (parameters are ``scale_jitter_params(key, B, (H, W), crop, min_side, max_side)``).
        images: (B, H, W, C), uint8 or float.
        crop: output side.
        min_side: smallest S (>= crop).
        max_side: largest S.

    Returns:
        float32 (B, crop, crop, C) in the input's value range.
    """
    _check_nhwc(images)
    batch, height, width, _ = images.shape
    rescaled_hw, offsets = scale_jitter_params(key, batch, (height, width), crop, min_side, max_side)
    # per-axis scale = new size / old size, exactly what jax.image.resize to that size uses
    scales = rescaled_hw.astype(jnp.float32) / jnp.asarray([height, width], jnp.float32)
    return _resample_windows(images, scales, offsets, (crop, crop))


@functools.partial(jax.jit, static_argnames=("batch_size",))
def pca_colour_offsets(
    key: jax.Array,
    batch_size: int,
    std: float = 0.1,
    eigvals: Sequence[float] = IMAGENET_EIGVAL,
    eigvecs: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
) -> jax.Array:
    """Per-image RGB offsets ``eigvecs @ (alpha * eigvals)``, alpha ~ N(0, std^2) per component.

    Args:
        key: PRNG key.
        batch_size: B.
        std: standard deviation of alpha.
        eigvals: the 3 eigenvalues.
        eigvecs: 3x3 matrix whose columns are the eigenvectors.

    Returns:
        float32 (B, 3).
    """
    alpha = std * jax.random.normal(key, (batch_size, 3), jnp.float32)
    weighted = alpha * jnp.asarray(eigvals, jnp.float32)  # (B, 3)
    return weighted @ jnp.asarray(eigvecs, jnp.float32).T  # (B, 3): row b = eigvecs @ weighted[b]


@jax.jit
def pca_colour_shift(
    key: jax.Array,
    images: jax.Array,
    std: float = 0.1,
    eigvals: Sequence[float] = IMAGENET_EIGVAL,
    eigvecs: Sequence[Sequence[float]] = IMAGENET_EIGVEC,
) -> jax.Array:
    """AlexNet/VGG "RGB colour shift": add one PCA-weighted RGB offset per image (no clipping, as AlexNet).

    Args:
        key: PRNG key (offsets are ``pca_colour_offsets(key, B, std, eigvals, eigvecs)``).
        images: (B, H, W, 3), float in [0, 1] (uint8 is mapped there with ``to_float``).
        std: standard deviation of the per-component weights alpha.
        eigvals: the 3 eigenvalues of the RGB covariance.
        eigvecs: 3x3 matrix whose columns are the eigenvectors.

    Returns:
        float32 (B, H, W, 3).
    """
    _check_nhwc(images)
    if images.shape[-1] != 3:
        raise ValueError(f"pca_colour_shift needs RGB images, got {images.shape[-1]} channels")
    offsets = pca_colour_offsets(key, images.shape[0], std, eigvals, eigvecs)
    return to_float(images) + offsets[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# torchvision-like transforms of the transfer-learning tutorial


@functools.partial(jax.jit, static_argnames=("batch_size", "image_hw", "scale", "ratio"))
def random_resized_crop_params(
    key: jax.Array,
    batch_size: int,
    image_hw: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """torchvision ``RandomResizedCrop.get_params`` per image: (top, left, height, width) of the crop box.

    Ten tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio); the first box that fits is
    used, else the whole image cropped to the nearest allowed aspect ratio (as torchvision).

    Args:
        key: PRNG key.
        batch_size: B.
        image_hw: input (height, width).
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio width / height.

    Returns:
        int32 (B, 4): top, left, height, width.
    """
    height, width = image_hw
    tries = 10
    # one uniform draw per image (fewer PRNG calls compile faster): tries areas, tries log-ratios, top, left
    draws = jax.random.uniform(key, (batch_size, 2 * tries + 2))
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[:, :tries])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(log_low + (log_high - log_low) * draws[:, tries : 2 * tries])
    box_w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    box_h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = jnp.argmax(fits, axis=1)  # index of the first fitting try
    any_fits = fits.any(axis=1)
    rows = jnp.arange(batch_size)
    box_h, box_w = box_h[rows, first], box_w[rows, first]
    # fallback (static): whole image, clipped to the allowed aspect range, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    box_h = jnp.where(any_fits, box_h, fallback_h)
    box_w = jnp.where(any_fits, box_w, fallback_w)
    top = jnp.where(any_fits, _uniform_int(draws[:, -2], height - box_h + 1), (height - box_h) // 2)
    left = jnp.where(any_fits, _uniform_int(draws[:, -1], width - box_w + 1), (width - box_w) // 2)
    return jnp.stack([top, left, box_h, box_w], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("size", "scale", "ratio"))
def random_resized_crop(
    key: jax.Array,
    images: jax.Array,
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """torchvision ``RandomResizedCrop(size, scale, ratio)``: a random box per image, resized bilinearly to ``size``.

    The box is resampled straight from the image, so its border pixels may blend in the pixels just
    outside the box; torchvision crops first and clamps there (a one-pixel-wide difference).

    Args:
        key: PRNG key (boxes are ``random_resized_crop_params(key, B, (H, W), scale, ratio)``).
        images: (B, H, W, C), uint8 or float.
        size: output side, or (height, width).
        scale: range of the box area as a fraction of the image area.
        ratio: range of the box aspect ratio width / height.

    Returns:
        float32 (B, h, w, C) in the input's value range.
    """
    _check_nhwc(images)
    batch, height, width, _ = images.shape
    out_h, out_w = _pair(size)
    boxes = random_resized_crop_params(key, batch, (height, width), tuple(scale), tuple(ratio))
    box_hw = boxes[:, 2:].astype(jnp.float32)
    scales = jnp.asarray([out_h, out_w], jnp.float32) / box_hw
    offsets = boxes[:, :2].astype(jnp.float32) * scales  # box corner in rescaled coordinates
    return _resample_windows(images, scales, offsets, (out_h, out_w))


def _degree_range(degrees: float | Sequence[float]) -> tuple[float, float]:
    """``degrees`` as (min, max); a number d means (-d, d) as in torchvision."""
    if isinstance(degrees, (int, float)):
        if degrees < 0:
            raise ValueError(f"degrees must be >= 0 when a single number, got {degrees}")
        return -float(degrees), float(degrees)
    low, high = (float(d) for d in degrees)
    if low > high:
        raise ValueError(f"degrees range must be (min, max) with min <= max, got {degrees}")
    return low, high


@functools.partial(jax.jit, static_argnames=("degrees",))
def random_rotation(key: jax.Array, images: jax.Array, degrees: float | tuple[float, float]) -> jax.Array:
    """torchvision ``RandomRotation(degrees)``: rotate each image counter-clockwise by angle ~ U(range).

    About the image centre, nearest-neighbour sampling, same size (expand=False), corners filled with 0.

    Args:
        key: PRNG key.
        images: (B, H, W, C), any dtype.
        degrees: d for U(-d, d), or (min, max).

    Returns:
        (B, H, W, C), the input's dtype.
    """
    _check_nhwc(images)
    low, high = _degree_range(degrees)
    batch, height, width, _ = images.shape
    angles = jnp.deg2rad(jax.random.uniform(key, (batch,), minval=low, maxval=high))
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    dy, dx = rows - (height - 1) / 2.0, cols - (width - 1) / 2.0

    def rotate_one(image, angle):
        # inverse map: the source of output pixel (dy, dx), y pointing down, counter-clockwise on screen
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        src_y = jnp.round(sin * dx + cos * dy + (height - 1) / 2.0).astype(jnp.int32)
        src_x = jnp.round(cos * dx - sin * dy + (width - 1) / 2.0).astype(jnp.int32)
        inside = (src_y >= 0) & (src_y < height) & (src_x >= 0) & (src_x < width)
        gathered = image[jnp.clip(src_y, 0, height - 1), jnp.clip(src_x, 0, width - 1)]
        return jnp.where(inside[..., None], gathered, jnp.zeros((), image.dtype))

    return jax.vmap(rotate_one)(images, angles)


def _grayscale(image: jax.Array) -> jax.Array:
    """(..., 3) RGB -> (..., 1) luma with torchvision's weights."""
    return (image * jnp.asarray(GRAY_WEIGHTS, image.dtype)).sum(axis=-1, keepdims=True)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision ``_blend``: ``factor * image + (1 - factor) * other`` clamped to [0, 1]."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def _jitter_range(value: float, name: str) -> tuple[float, float]:
    """The factor range [max(0, 1 - value), 1 + value] of ColorJitter."""
    if value < 0:
        raise ValueError(f"color_jitter {name} must be >= 0, got {value}")
    return max(0.0, 1.0 - value), 1.0 + value


@functools.partial(jax.jit, static_argnames=("brightness", "contrast", "saturation", "hue"))
def color_jitter(
    key: jax.Array,
    images: jax.Array,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
) -> jax.Array:
    """torchvision ``ColorJitter(brightness, contrast, saturation)`` per image, in a random order per image.

    Each enabled adjustment draws its factor from [max(0, 1 - v), 1 + v]: brightness scales the
    pixels, contrast blends with the image's mean luma, saturation with the per-pixel luma; results
    are clamped to [0, 1] after each step. Hue jitter is not implemented.

    Args:
        key: PRNG key.
        images: (B, H, W, 3), float in [0, 1] (uint8 is mapped there with ``to_float``).
        brightness: brightness jitter strength v (0 = off).
        contrast: contrast jitter strength (0 = off).
        saturation: saturation jitter strength (0 = off).
        hue: must be 0.

    Returns:
        float32 (B, H, W, 3) in [0, 1].

    Raises:
        NotImplementedError: hue != 0.
    """
    if hue != 0:
        raise NotImplementedError(f"color_jitter hue jitter is not implemented, got hue={hue}; pass hue=0")
    _check_nhwc(images)
    if images.shape[-1] != 3:
        raise ValueError(f"color_jitter needs RGB images, got {images.shape[-1]} channels")
    images = to_float(images)
    adjustments = {
        "brightness": lambda image, f: _blend(image, jnp.zeros_like(image), f),
        "contrast": lambda image, f: _blend(image, _grayscale(image).mean(), f),
        "saturation": lambda image, f: _blend(image, _grayscale(image), f),
    }
    strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
    enabled = [name for name, value in strengths.items() if _jitter_range(value, name) != (1.0, 1.0)]
    if not enabled:
        return images
    batch = images.shape[0]
    num = len(enabled)
    draws = jax.random.uniform(key, (batch, 2 * num))  # one PRNG call: K factors, K sort keys
    bounds = jnp.asarray([_jitter_range(strengths[name], name) for name in enabled], jnp.float32)  # (K, 2)
    factors = bounds[:, 0] + (bounds[:, 1] - bounds[:, 0]) * draws[:, :num]
    orders = jnp.argsort(draws[:, num:], axis=1)  # a random permutation of the K adjustments per image
    branches = [adjustments[name] for name in enabled]

    def jitter_one(image, image_factors, order):
        for step in range(num):
            which = order[step]
            image = jax.lax.switch(which, branches, image, image_factors[which])
        return image

    return jax.vmap(jitter_one)(images, factors, orders)


# ---------------------------------------------------------------------------------------------
# Conveniences


@functools.partial(jax.jit, static_argnames=("padding",))
def cifar_train_transform(
    key: jax.Array, images: jax.Array, mean: Sequence[float], std: Sequence[float], padding: int = 4
) -> jax.Array:
    """CIFAR training transform: ``random_crop_flip`` then ``normalize``.

    Args:
        key: PRNG key.
        images: uint8 (B, H, W, C).
        mean: per-channel means.
        std: per-channel standard deviations.
        padding: crop padding.

    Returns:
        float32 (B, H, W, C).
    """
    return normalize(random_crop_flip(key, images, padding), mean, std)


@jax.jit
def eval_transform(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Evaluation transform: ``normalize`` only.

    Args:
        images: uint8 (B, H, W, C).
        mean: per-channel means.
        std: per-channel standard deviations.

    Returns:
        float32 (B, H, W, C).
    """
    return normalize(images, mean, std)


def flip(images: jax.Array) -> jax.Array:
    """Every image mirrored left-right: (B, H, W, C)."""
    return images[:, :, ::-1]


def translate(images: jax.Array, dy: int, dx: int) -> jax.Array:
    """Every image's content moved ``dy`` rows down and ``dx`` columns right, zeros coming in (as
    ``random_crop`` pads): (B, H, W, C), the input's dtype."""
    pad = max(abs(dy), abs(dx))
    offsets = jnp.broadcast_to(jnp.asarray([pad - dy, pad - dx], jnp.int32), (images.shape[0], 2))
    return pad_and_crop(images, offsets, pad)


TTA_LEVELS = (0, 1, 2)  # 0: the image; 1: and its mirror; 2: both, also moved 2 pixels up-left and down-right


def tta_views(level: int, shift: int = 2) -> list[tuple[float, Callable[[jax.Array], jax.Array]]]:
    """The test-time views of ``level`` as (weight, uint8 images -> uint8 images); the weights sum to 1.

    Level 1 averages the image and its mirror (1/2 each); level 2 (airbench's "mirror + translate")
    gives those two 1/4 each and 1/8 to each of the four views moved by ``shift`` pixels up-left and
    down-right, mirrored or not.
    """
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be one of {TTA_LEVELS}, got {level}")
    if level == 0:
        return [(1.0, lambda x: x)]
    if level == 1:
        return [(0.5, lambda x: x), (0.5, flip)]
    moved = [lambda x: translate(x, -shift, -shift), lambda x: translate(x, shift, shift)]
    return ([(0.25, lambda x: x), (0.25, flip)]
            + [(0.125, view) for view in moved] + [(0.125, lambda x, v=view: flip(v(x))) for view in moved])


def transfer_transforms(rotation: float, jitter: float, crop: int = 224,
                        resize: int = 256) -> tuple[Callable, Callable]:
    """(train, eval) transforms of the VGG16 transfer tutorial, uint8 in, ImageNet-normalised float32
    (B, crop, crop, 3) out.

    train: RandomResizedCrop(resize, scale=(0.8, 1)) -> RandomRotation -> ColorJitter -> RandomHorizontalFlip
    -> CenterCrop(crop); eval: Resize(resize) -> CenterCrop(crop).
    """
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def train_tf(key, images):
        k_crop, k_rotate, k_jitter, k_flip = jax.random.split(key, 4)
        x = random_resized_crop(k_crop, images, resize, scale=(0.8, 1.0)) / 255.0  # float in [0, 1]
        x = random_rotation(k_rotate, x, float(rotation))
        x = color_jitter(k_jitter, x, brightness=jitter, contrast=jitter, saturation=jitter)
        x = random_flip(k_flip, x)
        return normalize(center_crop(x, crop), mean, std)

    def eval_tf(images):
        return normalize(resize_center_crop(images, resize=resize, crop=crop) / 255.0, mean, std)

    return train_tf, eval_tf


def unchanged(images: jax.Array) -> jax.Array:
    """The evaluation transform of inputs that need none (cached features)."""
    return images


def unchanged_train(key: jax.Array, images: jax.Array) -> jax.Array:
    """The training transform of inputs that need none (cached features: no augmentation)."""
    del key
    return images
