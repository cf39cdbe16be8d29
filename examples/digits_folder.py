"""Write scikit-learn's handwritten digits as a folder of PNGs, one subfolder per digit.

    python examples/digits_folder.py digits/ --size 64
    cnncodes sweep digits/ --plot digits-sweep.png
    cnncodes advise digits/

The 1,797 digits of ``sklearn.datasets.load_digits`` (8x8 greyscale, 17 grey levels, bundled
with scikit-learn, no download) are the classic "different from ImageNet" data set: tiny,
blocky, grey strokes on a flat background, nothing like a photo. Each one is upsampled (bilinear
by default) to `size` x `size` so that the backbone's own resize and crop see a smooth glyph,
and written as ``OUT/<digit>/<index>.png``. The files are byte-for-byte reproducible.
"""

import argparse
from pathlib import Path

import numpy as np

RESAMPLING = ("bilinear", "bicubic", "nearest")


def write_digits(out, *, size: int = 64, resample: str = "bilinear", ink: str = "dark",
                 per_class: int | None = None) -> Path:
    """Write the digits as ``out/<digit>/<index:04d>.png`` and return `out`.

    Parameters
    ----------
    out : path
        Folder to write; created if needed. Existing files of the same name are replaced.
    size : int
        Side of each PNG in pixels (the 8x8 digit is upsampled to it).
    resample : {"bilinear", "bicubic", "nearest"}
        PIL resampling filter for the upsampling.
    ink : {"dark", "light"}
        ``"dark"``: dark strokes on white, as written on paper; ``"light"``: white on black,
        as ``load_digits`` stores them.
    per_class : int, optional
        Keep only the first `per_class` digits of each class (for quick runs and tests).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if resample not in RESAMPLING:
        raise ValueError(f"resample must be one of {', '.join(RESAMPLING)}, got {resample!r}.")
    if ink not in ("dark", "light"):
        raise ValueError(f"ink must be 'dark' or 'light', got {ink!r}.")
    digits = load_digits()
    grey = np.rint(digits.images / 16.0 * 255.0).astype(np.uint8)  # 0..16 -> 0..255
    if ink == "dark":
        grey = 255 - grey
    filt = getattr(Image.Resampling, resample.upper())
    out = Path(out)
    kept: dict[int, int] = {}
    for index, (image, target) in enumerate(zip(grey, digits.target)):
        if per_class is not None and kept.get(int(target), 0) >= per_class:
            continue
        kept[int(target)] = kept.get(int(target), 0) + 1
        folder = out / str(int(target))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((size, size), filt).save(folder / f"{index:04d}.png")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write (one subfolder per digit)")
    p.add_argument("--size", type=int, default=64, help="side of each PNG (default %(default)s)")
    p.add_argument("--resample", default="bilinear", choices=RESAMPLING)
    p.add_argument("--ink", default="dark", choices=["dark", "light"])
    p.add_argument("--per-class", type=int, help="keep only the first N digits of each class")
    args = p.parse_args()
    out = write_digits(args.out, size=args.size, resample=args.resample, ink=args.ink,
                       per_class=args.per_class)
    n = sum(1 for _ in out.glob("*/*.png"))
    print(f"wrote {n} digits to {out}/<digit>/*.png ({args.size}x{args.size}, {args.resample}, {args.ink} ink)")


if __name__ == "__main__":
    main()
