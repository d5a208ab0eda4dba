"""The one way the project finds images in a folder: which folders are classes, which files are images.

Training (the scan, the splits, the decode-once cache), the explain tools and the serving tools all call these, so
a file one of them takes is a file all of them take. The rules:

- hidden entries are skipped everywhere: folders and files whose name starts with "." (`.ipynb_checkpoints/`,
  `.DS_Store`, macOS's AppleDouble `._IMG_0001.jpg` beside every photo copied from a Mac);
- an image is a file with one of IMAGE_EXTENSIONS (case-insensitive), GIF included (its first frame);
- decoding accepts exactly the Pillow formats IMAGE_FORMATS (`visionapp.decode.load_image`), whatever a file's
  name says: a file Pillow could open with another plugin (EPS, which runs Ghostscript, say) is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

# The file extensions taken for images when a folder is read.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
# The Pillow formats decoded (Image.open's formats=): those extensions' formats. JPEG includes MPO, the JPEG
# files with a second (preview) image that many phones and cameras write: Pillow's JPEG opener returns them.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")
FORMATS_TEXT = "JPEG, PNG, GIF, WebP, BMP, TIFF, PPM/PGM"  # what error messages and the README name


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_file(path: str | Path) -> bool:
    name = os.path.basename(path)
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def walk_files(folder: str | Path, *, follow_outside: bool = True, outside: list[Path] | None = None) -> list[Path]:
    """Every file under `folder` that is not hidden and not inside a hidden folder, in sorted walk order.

    Symlinks are followed, each real folder and file visited once (a link back up the tree, `photos/a/up -> ..`,
    ends there instead of looping; a file reached through two links is one file). With `follow_outside` false, a
    link that leads out of `folder` is not followed and is added to `outside` instead (predict-folder lists them);
    training follows links wherever they lead (a data set is often a folder of links).
    """
    root = Path(folder).resolve()
    seen: set[tuple[int, int]] = set()  # (device, inode) of each folder and file taken
    out: list[Path] = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        here = os.stat(top)
        if (here.st_dev, here.st_ino) in seen:  # reached again through a link: already walked
            dirs[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirs[:] = [
            d for d in sorted(dirs) if not is_hidden(d) and _followed(Path(top, d), root, follow_outside, outside)
        ]
        for f in sorted(files):
            path = Path(top, f)
            if is_hidden(f) or not _followed(path, root, follow_outside, outside):
                continue
            try:
                st = path.stat()
            except OSError:  # a dangling link: listed as a file, its reader says why it cannot be read
                out.append(path)
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                out.append(path)
    return out


def _followed(path: Path, root: Path, follow_outside: bool, outside: list[Path] | None) -> bool:
    """Whether the walk takes `path`: anything but a link leading out of `root` when those are not followed."""
    if follow_outside or not path.is_symlink() or path.resolve().is_relative_to(root):
        return True
    if outside is not None:
        outside.append(path)
    return False


def find_images(folder: str | Path) -> list[Path]:
    """The images under `folder` (recursive, sorted), by the rules above."""
    return [f for f in walk_files(folder) if is_image_file(f)]


def expand(paths: list[str | Path]) -> list[Path]:
    """Files as given (whatever their name), folders as the images under them: what a command line of images
    and folders means."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += find_images(p) if p.is_dir() else [p]
    return out


def find_classes(split_dir: str | Path) -> list[str]:
    """The class folders of an ImageFolder split (split_dir/<class>/...): its folders that are not hidden, sorted."""
    return sorted(d.name for d in Path(split_dir).iterdir() if d.is_dir() and not is_hidden(d.name))
