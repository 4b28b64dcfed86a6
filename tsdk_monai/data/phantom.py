"""The embedded demo data: deterministic 2D ultrasound-like phantoms, so the pipeline runs with no download.

Each phantom is simulated the way a B-mode image forms, in a few cheap steps:
a convex-probe fan (sector) field of view; a tissue echogenicity map with smooth texture; an elliptical
organ (a fetal-head-like structure: bright rim, dark interior, optionally an inner structure as class 2);
random scatterers whose amplitude follows the echogenicity, blurred by an anisotropic point-spread function
(axial sharper than lateral) to give speckle; depth attenuation with partial gain compensation, an acoustic
shadow behind the bright rim; and log compression to 8 bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["make_phantom", "write_demo_data"]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-8)


def make_phantom(rng: np.random.Generator, size: int = 128, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: ``(image uint8 (size, size), label uint8 (size, size))`` with labels in ``[0, num_classes)``."""
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes must be 2 or 3 for the demo phantom, got {num_classes}")
    h = w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    # convex probe: apex above the image, fan of +-half_angle
    apex_y, apex_x = -0.25 * h, w / 2 + rng.uniform(-0.03, 0.03) * w
    r = np.hypot(y - apex_y, x - apex_x)
    theta = np.arctan2(x - apex_x, y - apex_y)
    half_angle = np.deg2rad(rng.uniform(32, 40))
    r0, r1 = 0.3 * h, rng.uniform(1.15, 1.22) * h
    fan = (np.abs(theta) < half_angle) & (r > r0) & (r < r1)

    # tissue background: layered texture
    echo = 0.3 + 0.1 * _smooth_noise(rng, (h, w), size / 12) + 0.06 * _smooth_noise(rng, (h, w), size / 40)
    echo += 0.15 * np.exp(-((r - r0 - 0.08 * h) ** 2) / (2 * (0.03 * h) ** 2))  # bright near-field band

    # the organ: an ellipse with a bright rim, well inside the fan
    cy, cx = rng.uniform(0.45, 0.62) * h, rng.uniform(0.38, 0.62) * w
    a, b = rng.uniform(0.17, 0.26) * size, rng.uniform(0.13, 0.2) * size
    phi = rng.uniform(0, np.pi)
    u = ((x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)) / a
    v = (-(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)) / b
    rho = np.sqrt(u**2 + v**2)
    rim_w = 0.08 + rng.uniform(0, 0.04)
    inside = rho <= 1.0
    rim = np.abs(rho - 1.0 + rim_w / 2) < rim_w / 2
    fluid = (rho > 1.0) & (rho < rng.uniform(1.25, 1.5))  # dark amniotic fluid around the head
    echo = np.where(fluid, 0.03, echo)
    echo = np.where(inside, 0.3 + 0.08 * _smooth_noise(rng, (h, w), size / 20), echo)
    label = inside.astype(np.uint8)
    if num_classes == 3:  # an inner structure (e.g. a ventricle-like region)
        iu, iv = u - rng.uniform(-0.2, 0.2), v - rng.uniform(-0.2, 0.2)
        inner = np.sqrt((iu / 0.45) ** 2 + (iv / 0.3) ** 2) <= 1.0
        echo = np.where(inner, 2.5, echo)
        label[inner & inside] = 2
    echo = np.where(rim, 5.0, echo)
    # midline echo inside the head
    echo = np.where(inside & (np.abs(v) < 0.025) & (np.abs(u) < 0.8), 0.9, echo)
    echo = np.clip(echo, 0.02, None)

    # acoustic shadow: rays that crossed the bright rim lose energy below it
    ray_bins = np.round((theta + half_angle) / (2 * half_angle) * (w * 2)).astype(int)
    shadow = np.ones((h, w))
    rim_depth = np.full(w * 2 + 1, np.inf)
    rim_rows = np.where(rim & fan)
    np.minimum.at(rim_depth, np.clip(ray_bins[rim_rows], 0, w * 2), r[rim_rows])
    behind = r > rim_depth[np.clip(ray_bins, 0, w * 2)] + 0.02 * h
    shadow[behind & ~inside] = 0.55
    shadow = ndimage.gaussian_filter(shadow, size / 64)

    # speckle: complex scatterers blurred by an anisotropic PSF
    scat = (rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))) * np.sqrt(echo)
    psf_sigma = (0.9 * size / 128, 2.2 * size / 128)  # (axial, lateral) in pixels
    env = np.abs(ndimage.gaussian_filter(scat.real, psf_sigma) + 1j * ndimage.gaussian_filter(scat.imag, psf_sigma))
    depth = np.clip((r - r0) / (r1 - r0), 0, 1)
    env *= np.exp(-1.2 * depth) * (1 + 0.6 * depth) * shadow  # attenuation, partly compensated by gain

    img = np.log1p(12 * env / (np.percentile(env[fan], 99.8) + 1e-8)) / np.log1p(12)
    img = np.clip(img**1.6 * rng.uniform(0.9, 1.05), 0, 1) * fan
    image = np.round(img * 255).astype(np.uint8)
    label[~fan] = 0
    return image, label


def write_demo_data(
    out: str | Path,
    n: int = 40,
    size: int = 128,
    num_classes: int = 2,
    seed: int = 0,
    n_labeled: int = 8,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> Path:
    """Write ``n`` phantoms to ``out/images`` and ``out/labels`` (PNG) and a datalist; return its path.

    The same arguments always give the same bytes. Case ids are ``000_demo``, ``001_demo``, ...; every
    fifth case has a second view (``005_2demo``) of the same "exam", to exercise grouped splits.
    """
    from tsdk_monai.data.prepare import prepare

    out = Path(out)
    images_dir, labels_dir = out / "images", out / "labels"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        exam = i if i % 5 != 1 else i - 1  # case 1, 6, 11, ... is a second view of case 0, 5, 10, ...
        names.append(f"{exam:03d}_demo" if exam == i else f"{exam:03d}_2demo")
    for i, stem in enumerate(names):
        img_path, lab_path = images_dir / f"{stem}.png", labels_dir / f"{stem}.png"
        if img_path.exists() and lab_path.exists():
            continue
        image, label = make_phantom(np.random.default_rng([seed, i]), size=size, num_classes=num_classes)
        _save_png(image, img_path)
        _save_png(label, lab_path)
    names_list = ["background", "head"] + (["inner"] if num_classes == 3 else [])
    return prepare(
        str(images_dir), str(labels_dir), str(out), n_labeled=n_labeled, seed=seed, test_fraction=test_fraction,
        val_fraction=val_fraction, num_classes=num_classes, class_names=names_list, name="tsdk_demo_phantom",
    )


def _save_png(arr: np.ndarray, path: Path) -> None:
    from tsdk_monai.utils import atomic_write_bytes
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
