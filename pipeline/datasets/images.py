"""Image checks that avoid decoding what is intact, the one writer of images into a dataset, and
the one reader and letterbox that every model input goes through (inference, calibration, parity).

A JPEG that ends with its end-of-image marker is taken as whole after a header read (PIL
`Image.open` reads only the header); a PNG that ends with its IEND chunk after its chunk
checksums are verified (a read, no decompression); anything else is decoded once to find out. Images Ultralytics would read wrongly or not at all (CMYK, 16-bit, palette,
GIF...) are converted to 8-bit RGB; the rest are hard-linked (copied across filesystems).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# Extensions picked up as images when a folder is scanned (more than Ultralytics reads: the
# ones it cannot read are converted).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo", ".jp2",
    ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".dng", ".heic", ".heif", ".avif",
})
# Suffixes Ultralytics lists as images (ultralytics.data.utils.IMG_FORMATS, without the ones PIL
# cannot open anyway); an image kept as is must carry one of these.
ULTRALYTICS_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".jp2"})
# PIL formats Ultralytics' check_image accepts, with the suffix a kept file gets.
SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif",
                    "WEBP": ".webp", "JPEG2000": ".jp2"}
MIN_SIDE = 10  # Ultralytics refuses images under 10 px on a side
# OpenCV's imread refuses images above 2**30 pixels (CV_IO_MAX_IMAGE_PIXELS), and Ultralytics trains
# from cv2.imread: such an image would pass PIL and kill training with a cv2 traceback.
MAX_PIXELS = 2**30
PAD_VALUE = 114  # Ultralytics' letterbox grey
EXIF_ORIENTATION = 0x0112
_PLAIN_MODES = frozenset({"RGB", "L", "RGBA", "LA"})
_JPEG_END = b"\xff\xd9"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# Decompression-bomb warnings are for untrusted web input; a dataset's big images are wanted.
Image.MAX_IMAGE_PIXELS = None
assert not ImageFile.LOAD_TRUNCATED_IMAGES  # a truncated image must fail to decode, not be grey-filled


@dataclass
class ImageCheck:
    """What inspect() found: size, and whether to link, re-encode or skip the file."""

    width: int = 0
    height: int = 0
    action: str = "link"  # link | convert | skip
    defect: str | None = None  # DEFECTS kind when the file is converted or skipped
    detail: str = ""
    format: str = ""

    def suffix(self, src: Path) -> str:
        """The suffix the file gets in the dataset."""
        if self.action == "convert":
            return ".jpg" if self.format in ("JPEG", "MPO") else ".png"
        ext = src.suffix.lower()
        return ext if ext in ULTRALYTICS_SUFFIXES else SUFFIX_OF_FORMAT[self.format]


def _tail(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - n))
        return f.read()


def _decodes(path: Path) -> str | None:
    """None when the whole image decodes, else the decoder's complaint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
        return None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        return f"{type(exc).__name__}: {exc}"


def _verifies(path: Path) -> str | None:
    """None when PIL's verify() (PNG chunk CRCs) passes, else its complaint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.verify()
        return None
    except Exception as exc:  # PIL raises SyntaxError, OSError... for broken chunks
        return f"{type(exc).__name__}: {exc}"


def inspect(path: Path) -> ImageCheck:
    """Displayed size and fate of one image, reading only its header and last bytes when it is intact."""
    try:
        if os.path.getsize(path) == 0:
            return ImageCheck(action="skip", defect="unreadable_image", detail="empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                # The displayed size (EXIF orientation applied): labels refer to it, as in
                # Ultralytics' exif_size and in the boxes infer writes.
                fmt, (w, h), mode = im.format or "", _oriented(im.size, _orientation(im)), im.mode
                rawmode = im.tile[0].args if im.tile and isinstance(im.tile[0].args, str) else ""
    except Exception as exc:
        # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...; once ultralytics
        # is imported, its Image.open patch turns an unidentified file into an ImportError (it
        # tries the optional HEIF plugin). All mean the same here: this file is not an image.
        return ImageCheck(action="skip", defect="unreadable_image", detail=f"{type(exc).__name__}: {exc}")
    check = ImageCheck(width=w, height=h, format=fmt)
    if w < MIN_SIDE or h < MIN_SIDE:
        return ImageCheck(w, h, "skip", "tiny_image", f"{w}x{h} px", fmt)
    if w * h > MAX_PIXELS:  # a header read: a 1.5 MB PNG may hold 40000x40000 px
        return ImageCheck(w, h, "skip", "huge_image", f"{w}x{h} = {w * h:,} px > {MAX_PIXELS:,} px", fmt)

    if fmt in ("JPEG", "MPO"):
        intact = _tail(path, 2) == _JPEG_END
    elif fmt == "PNG":
        intact = _tail(path, len(_PNG_END)) == _PNG_END
        # Chunk checksums cost a read, no decompression; Ultralytics' own check (verify) would
        # otherwise drop a corrupt PNG silently at training time.
        problem = _verifies(path) if intact else None
        if problem is not None:
            return ImageCheck(w, h, "skip", "unreadable_image", problem, fmt)
    else:
        intact = False  # no cheap end check: decode
    if not intact:
        problem = _decodes(path)
        if problem is not None:
            kind = "truncated_image" if "truncated" in problem.lower() or fmt in ("JPEG", "PNG") else "unreadable_image"
            return ImageCheck(w, h, "skip", kind, problem, fmt)
        if fmt in ("JPEG", "MPO", "PNG"):
            check.action, check.defect, check.detail = "convert", "repaired_image", "no end marker at the end of the file"

    if fmt not in SUFFIX_OF_FORMAT:
        check.action, check.defect, check.detail = "convert", "unsupported_format", fmt
    elif mode == "CMYK":
        check.action, check.defect, check.detail = "convert", "cmyk_image", mode
    elif mode.startswith("I") or mode == "F" or (fmt in ("PNG", "TIFF") and ";16" in rawmode):
        check.action, check.defect, check.detail = "convert", "high_bit_depth_image", rawmode or mode
    elif mode in ("P", "PA"):
        check.action, check.defect, check.detail = "convert", "palette_image", mode
    elif mode not in _PLAIN_MODES:
        check.action, check.defect, check.detail = "convert", "unusual_mode_image", mode
    return check


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (16-bit scaled, palette transparency resolved, CMYK converted)."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif im.mode != "F":
            a = a / 257.0  # 16-bit range 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")


def write_image(src: Path, dst: Path, check: ImageCheck) -> None:
    """Put `src` at `dst`: a hard link (copy across filesystems) or an 8-bit RGB re-encode."""
    if check.action == "link":
        try:
            os.link(src, dst)
        except OSError:  # other filesystem, or a file the user may read but not link
            shutil.copyfile(src, dst)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(src) as im:
            im.load()
            exif = im.info.get("exif")
            rgb = to_rgb8(im)
    extra = {"exif": exif} if exif else {}
    if dst.suffix == ".jpg":
        rgb.save(dst, "JPEG", quality=95, **extra)
    else:
        rgb.save(dst, "PNG", compress_level=1, **extra)


# -- model inputs: displayed size, decoding, letterbox ----------------------------------------------


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1 = as stored); a broken EXIF block counts as none, as in Ultralytics' exif_size."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # PIL raises several kinds for malformed EXIF; the pixels are still fine
        return 1


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) after EXIF orientation: 5-8 swap the axes."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), from its header only.

    YOLO labels refer to the displayed image; raises on a file that is not a readable image.
    """
    with Image.open(path) as im:
        return _oriented(im.size, _orientation(im))


def read_image(path: Path, min_size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image as displayed (EXIF applied): (RGB uint8 array, original (width, height)).

    With `min_size` (displayed width, height), a JPEG may be decoded at 1/2, 1/4 or 1/8 scale by
    libjpeg's DCT scaling when it stays at least that large: several times faster for photos much
    larger than the network input. Truncated or corrupt files raise.
    """
    from PIL import ImageOps

    with Image.open(path) as im:
        orientation = _orientation(im)
        full = _oriented(im.size, orientation)
        if min_size is not None and im.format == "JPEG":
            im.draft(None, _oriented(min_size, orientation))
        im.load()  # decodes now, so a truncated file fails here and not later
        im = ImageOps.exif_transpose(im) if orientation != 1 else im
        # The datasets' conversion (16-bit scaled, palette transparency, CMYK): what training saw.
        return np.asarray(im if im.mode == "RGB" else to_rgb8(im)), full


def letterbox(img: np.ndarray, shape: tuple[int, int],
              size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize `img` into `shape` (h, w) keeping its aspect, pad with grey: Ultralytics' LetterBox(auto=False).

    `size` is the image's original (w, h) when `img` was decoded smaller (read_image's `min_size`);
    the scale is computed from it, so a reduced decode lands on the same geometry. Returns the padded
    image and (left, top, new_w, new_h), which map network pixels back to original pixels:
    x_orig = (x - left) * w / new_w.
    """
    import cv2

    w0, h0 = size or (img.shape[1], img.shape[0])
    r = min(shape[0] / h0, shape[1] / w0)
    nw, nh = max(round(w0 * r), 1), max(round(h0 * r), 1)
    if img.shape[1] != nw or img.shape[0] != nh:
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dw, dh = (shape[1] - nw) / 2, (shape[0] - nh) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return np.ascontiguousarray(img), (left, top, nw, nh)
