"""What the example scripts share: listing a class-folder data set, a few photos per class."""

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def photos(folder, limit=None):
    """(path, label) of the photos in folder/<class>/, the first `limit` of each class by name."""
    out = []
    for class_dir in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        out += [(f, class_dir.name) for f in files[:limit]]
    return out
