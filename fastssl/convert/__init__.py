"""fastssl-convert: turn an ImageFolder tree or Fashion-MNIST into the shard format of ``pipelines.formats``.

    fastssl-convert SRC DST [--max-side 512] [--quality 95] [--shard-size 10000] [--workers N]
                            [--seed 0] [--limit N | --limit train=N,val=M] [--overwrite] [--no-progress]
                            [--formats wds,ffcv [--ffcv-max-side 512] [--ffcv-quality 90]]
                            [--max-pixels N] [--verify]
    fastssl-convert --verify DST
    fastssl-convert SRC DST --add-names

SRC is an ImageFolder tree (one folder per class; optional ``train/`` and ``val/`` sub-splits) or the
name ``fashion-mnist``. Every sample becomes a JPEG: a JPEG that already fits ``--max-side`` is stored
byte for byte, anything else is decoded, made RGB (or kept grayscale), shrunk so its longer side is
``--max-side`` and encoded at ``--quality`` (CMYK, palette and alpha images become RGB on white,
16-bit images keep their high byte, EXIF orientation is applied). Files that cannot be used are skipped
and listed with a reason in the summary and in ``manifest.json`` (``"skipped"``); they never stop the
run: truncated or corrupt data, empty files, non-images with an image extension, files declaring more
than ``--max-pixels`` pixels (decompression bombs, rejected before decoding), unreadable files. Empty
class folders, symlink loops (each real folder is entered once) and unlistable folders are listed there too.
Each real image file (device and inode) is converted once, under the class whose folder holds it: a symlink
that leads into another class folder or above the class folders is listed and not followed, and a second
path to a file already found is listed; links to storage outside SRC are followed.

A kill leaves no partial file under a final name: a shard is written to a hidden temp name and renamed
when complete, and ``manifest.json`` comes last. A hidden progress journal records each finished shard's
sha256; rerunning the same command keeps the finished shards that still verify and converts the rest,
with the same bytes as an uninterrupted run. ``--verify`` rereads every shard, index and .beton against
the manifest (sizes, sha256, sample counts) and exits 1 naming the first bad file; a write failure
(disk full, I/O error) also exits 1 naming the file; user errors exit 2.

The output is a pure function of the input and the settings (same bytes on every run, whatever
``--workers``), so a converted dataset can be checked by its manifest's sha256 sums.

``--formats wds,ffcv`` also writes each split as one FFCV file, ``<split>.beton`` (for
``data.backend=ffcv``), from the shards just written: same samples in the same order, re-encoded as
JPEG with the longer side at most ``--ffcv-max-side`` at ``--ffcv-quality``. Each is written to a
hidden temp name and renamed when complete. FFCV's writer places images on pages in the order its
worker processes finish them, so with ``--workers`` > 1 a .beton's bytes (not its images) can differ
between runs; the manifest records each file's size and sha256.

Each image's source name (its path under SRC, or ``train/123`` for Fashion-MNIST) is kept beside the
shards (``<split>.names.json.gz``, see ``pipelines.formats``): the ImageNet 1 % / 10 % label lists select
images by file name. ``--add-names`` adds them to a dataset converted before they were kept, from the same
SRC, without re-encoding an image (checked against the stored labels first).

The package follows the conversion's stages; each file holds one:

    find.py     finding the images (ImageFolder scan, Fashion-MNIST files) and planning each split's order
    image.py    reading and normalizing one image into the JPEG to store (runs in worker processes)
    write.py    writing shards (atomically, in plan order) and .beton files; preparing DST
    resume.py   the progress journal of an unfinished conversion and the fingerprint a rerun must match
    report.py   the summary printed at the end
    verify.py   ``--verify``: rereading a converted dataset against its manifest
    names.py    ``--add-names``: the source names of a dataset converted before they were kept
    run.py      ``convert()``: the stages in order, then the manifest
    cli.py      ``fastssl-convert`` (``main``)
"""

from fastssl.convert.cli import build_parser, main
from fastssl.convert.errors import ConvertError, OutputError, VerifyError
from fastssl.convert.find import (
    FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_EXTENSIONS,
    mixed_order,
    read_idx,
)
from fastssl.convert.image import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    DEFAULT_QUALITY,
    KEPT,
    REENCODED,
    RESIZED,
    encode_image_bytes,
)
from fastssl.convert.report import PROG, format_summary
from fastssl.convert.resume import JOURNAL
from fastssl.convert.run import convert, default_workers
from fastssl.convert.verify import verify
from fastssl.convert.write import (
    DEFAULT_FFCV_MAX_SIDE,
    DEFAULT_FFCV_QUALITY,
    DEFAULT_SHARD_SIZE,
    FFCV_MAX_SIDE_LIMIT,
    FORMATS,
)

__all__ = [
    "DEFAULT_FFCV_MAX_SIDE", "DEFAULT_FFCV_QUALITY", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_SIDE", "DEFAULT_QUALITY",
    "DEFAULT_SHARD_SIZE", "FASHION_MNIST", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FFCV_MAX_SIDE_LIMIT",
    "FORMATS", "IMAGE_EXTENSIONS", "JOURNAL", "KEPT", "PROG", "REENCODED", "RESIZED", "ConvertError", "OutputError",
    "VerifyError", "build_parser", "convert", "default_workers", "encode_image_bytes", "format_summary", "main",
    "mixed_order", "read_idx", "verify",
]  # fmt: skip
