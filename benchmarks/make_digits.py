"""Write scikit-learn's digits (1,797 images, 10 classes) as class-folder PNGs at 64 px.

    python benchmarks/make_digits.py /tmp/digits64
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: str) -> None:
    digits = load_digits()
    root = Path(out)
    for k, (img, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.uint8(np.round(img / 16.0 * 255))  # 0..16 -> 0..255, white digit on black
        Image.fromarray(pixels, "L").resize((64, 64), Image.BILINEAR).save(folder / f"{k:04d}.png")
    print(f"wrote {len(digits.images)} PNGs to {root}")


if __name__ == "__main__":
    main(sys.argv[1])
