#!/usr/bin/env python3
"""Build `demo/`: the small real benchmark that `setar-engine run` uses when given no data.

Everything comes from what package registries ship (no other network):

- Debian bookworm packages, fetched with `apt-get download` and unpacked with `dpkg-deb -x`:
  `tuxpaint-stamps-default` (photographic PNG cut-outs), `gcompris-qt-data` (Qt `.rcc`
  resource bundles holding Wikimedia photos; unpacked by the small reader below),
  `gimp-data` (GIMP `.pat` texture tiles; read by the small reader below),
  `mypaint-data-extras` (scanned paper/canvas backgrounds);
- PyPI `scikit-image` (three CC0 texture photos from `skimage/data`), fetched with
  `pip download` as one pinned wheel.

The images are picked by the explicit list `MANIFEST` below (so the result is reproducible),
converted and written as

    demo/id/val/<class>/*.jpg     ID split used by the search (ImageFolder layout)
    demo/id/test/<class>/*.jpg    ID split used for the final scores
    demo/ood/<set>/*.jpg          OOD sets
    demo/labels.txt               class names, one a line, in ImageFolder (sorted) order
    demo/SOURCES.tsv              every output file: package, original path, licence, author
    demo/README.md                what is there and how it was made

Conversion: RGBA cut-outs are cropped to their opaque part plus a 6 % margin and composited on
white; every image is downscaled (Lanczos) so that its short side is at most 256 px (never
upscaled); GIMP pattern tiles (20-156 px) are tiled, not resampled, to 256 x 256; everything is
saved as baseline RGB JPEG, quality 90.

Usage: python3 scripts/make_demo_data.py [--out demo] [--cache /tmp/setar-demo-cache]
Needs: apt-get + dpkg-deb (Debian/Ubuntu), pip, Pillow (with WebP support).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import PIL
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Sources: the exact versions this demo was made from (sha256 of the downloaded archive).
# ----------------------------------------------------------------------------------------------

DEBS = {
    "tuxpaint-stamps-default": (
        "2022.06.04-1",
        "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34",
    ),
    "gcompris-qt-data": (
        "3.1-2",
        "e9cf06ab2105529068df73085784e835d2ff03f870d2a8091f09125d40abac9f",
    ),
    "gimp-data": (
        "2.10.34-1+deb12u10",
        "89007a69d4ef2b0440e5419e75d4112cfd1c49e97db38220d210b9f86322be7c",
    ),
    "mypaint-data-extras": (
        "2.0.1-9",
        "9d5971baa5eb411309940ea2cfe11aa7f6ec2c39e7f9ecd2bbef81fc6404b1d1",
    ),
}
WHEEL = {
    "name": "scikit-image",
    "version": "0.26.0",
    "file": "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "sha256": "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
}

# source key -> (package, how to find a path, licence when the package gives one for all files)
SOURCES = {
    "tuxpaint": ("tuxpaint-stamps-default", "usr/share/tuxpaint/stamps/", "GPL-2"),
    "gcompris": ("gcompris-qt-data", "usr/share/gcompris-qt/rcc/<activity>.rcc", None),
    "gimp": (
        "gimp-data",
        "usr/share/gimp/2.0/patterns/",
        "GPL-3+ and GPL-2+ and LGPL-3+ and MIT and Expat and BSD-2-clause (Debian `Files: *`)",
    ),
    "mypaint": ("mypaint-data-extras", "usr/share/mypaint/backgrounds/", "CC0-1.0"),
    "skimage": ("scikit-image", "skimage/data/", "CC0-1.0"),
}

# ----------------------------------------------------------------------------------------------
# The explicit list. One line: <destination> <source> <path>.
#   destination: id/<class> (split: every third image of a class, starting with the first, goes
#                to val, the rest to test) or ood/<set>
#   gcompris paths: <activity>/<path inside /gcompris/src/activities/<activity>/>
# Dropped on purpose: tuxpaint stamps whose opaque part is under ~100 px long (most vegetables
# and small fruits: too small to be useful photos), drawings and `cartoon/` stamps, gcompris
# `lang` word images (drawings), Van Gogh paintings in `details`, landmarks that occur twice.
# ----------------------------------------------------------------------------------------------

MANIFEST = """
id/bird tuxpaint animals/birds/adelaide-rosella.png
id/bird tuxpaint animals/birds/blackbird.png
id/bird tuxpaint animals/birds/crow.png
id/bird tuxpaint animals/birds/crowned_crane.png
id/bird tuxpaint animals/birds/drake.png
id/bird tuxpaint animals/birds/gander.png
id/bird tuxpaint animals/birds/guineafowl.png
id/bird tuxpaint animals/birds/hen.png
id/bird tuxpaint animals/birds/lark.png
id/bird tuxpaint animals/birds/magpie.png
id/bird tuxpaint animals/birds/ostrich.png
id/bird tuxpaint animals/birds/owl.png
id/bird tuxpaint animals/birds/pelican.png
id/bird tuxpaint animals/birds/pigeon.png
id/bird tuxpaint animals/birds/pink_flamingo.png
id/bird tuxpaint animals/birds/rainbow-lorikeet.png
id/bird gcompris erase/resource/heron.webp
id/bird gcompris erase/resource/kingfisher.webp
id/bird gcompris erase/resource/gosling.webp
id/bird gcompris erase/resource/northern_harrier.webp
id/bird gcompris erase/resource/penguin.webp
id/bird gcompris erase/resource/spoonbills.webp
id/bird gcompris erase/resource/swans.webp
id/bird gcompris erase/resource/toucan.webp

id/fish gcompris categorization/resource/images/fishes/fish1.webp
id/fish gcompris categorization/resource/images/fishes/fish2.webp
id/fish gcompris categorization/resource/images/fishes/fish3.webp
id/fish gcompris categorization/resource/images/fishes/fish4.webp
id/fish gcompris categorization/resource/images/fishes/fish5.webp
id/fish gcompris categorization/resource/images/fishes/fish6.webp
id/fish gcompris categorization/resource/images/fishes/fish7.webp
id/fish gcompris categorization/resource/images/fishes/fish8.webp
id/fish gcompris categorization/resource/images/fishes/fish9.webp
id/fish gcompris categorization/resource/images/fishes/fish10.webp
id/fish gcompris categorization/resource/images/fishes/fish11.webp
id/fish gcompris categorization/resource/images/fishes/fish12.webp
id/fish gcompris categorization/resource/images/fishes/fish13.webp
id/fish gcompris categorization/resource/images/fishes/fish14.webp
id/fish gcompris categorization/resource/images/fishes/fish15.webp
id/fish gcompris categorization/resource/images/fishes/fish16.webp
id/fish tuxpaint animals/fish/bluegroper.png
id/fish tuxpaint animals/fish/butterflyfish.png
id/fish tuxpaint animals/fish/clownfish.png
id/fish tuxpaint animals/fish/coraltrout.png
id/fish tuxpaint animals/fish/dolphinfish.png
id/fish tuxpaint animals/fish/lionfish.png
id/fish tuxpaint animals/fish/moonwrasse.png
id/fish tuxpaint animals/fish/stripedfish.png

id/flower tuxpaint plants/flowers/adeenia.png
id/flower tuxpaint plants/flowers/anemone_red.png
id/flower tuxpaint plants/flowers/anthoorium.png
id/flower tuxpaint plants/flowers/bolsom.png
id/flower tuxpaint plants/flowers/chemparathi.png
id/flower tuxpaint plants/flowers/daffodil.png
id/flower tuxpaint plants/flowers/flower1.png
id/flower tuxpaint plants/flowers/flower2.png
id/flower tuxpaint plants/flowers/flower3.png
id/flower tuxpaint plants/flowers/flower4.png
id/flower tuxpaint plants/flowers/flower5.png
id/flower tuxpaint plants/flowers/flower6.png
id/flower tuxpaint plants/flowers/flower7.png
id/flower tuxpaint plants/flowers/flower8.png
id/flower tuxpaint plants/flowers/flower9.png
id/flower tuxpaint plants/flowers/flower10.png
id/flower tuxpaint plants/flowers/iris.png
id/flower tuxpaint plants/flowers/marigold.png
id/flower tuxpaint plants/flowers/pigface.png
id/flower tuxpaint plants/flowers/red-gazania.png
id/flower tuxpaint plants/flowers/rose.png
id/flower tuxpaint plants/flowers/whitestar-petunia.png
id/flower tuxpaint plants/flowers/yellow-flower.png

id/mammal tuxpaint animals/mammals/elephant.png
id/mammal tuxpaint animals/mammals/giraffe.png
id/mammal tuxpaint animals/mammals/hippopotamus.png
id/mammal tuxpaint animals/mammals/pig_golden.png
id/mammal tuxpaint animals/mammals/rhino_black.png
id/mammal tuxpaint animals/mammals/wildboar.png
id/mammal tuxpaint animals/mammals/bears/bear.png
id/mammal tuxpaint animals/mammals/bovines/cow.png
id/mammal tuxpaint animals/mammals/bovines/sheep.png
id/mammal tuxpaint animals/mammals/camel/camel.png
id/mammal tuxpaint animals/mammals/cats/lion-2.png
id/mammal tuxpaint animals/mammals/cats/tiger.png
id/mammal tuxpaint animals/mammals/deer/doe.png
id/mammal tuxpaint animals/mammals/dogs/dog.png
id/mammal tuxpaint animals/mammals/equines/zebra.png
id/mammal tuxpaint animals/marsupials/koala.png
id/mammal gcompris erase/resource/alpaca.webp
id/mammal gcompris erase/resource/cheetah.webp
id/mammal gcompris erase/resource/gorilla.webp
id/mammal gcompris erase/resource/kitten.webp
id/mammal gcompris erase/resource/meerkats.webp
id/mammal gcompris erase/resource/red_panda.webp
id/mammal gcompris erase/resource/squirrel.webp
id/mammal gcompris erase/resource/horse.webp

id/tool gcompris categorization/resource/images/tools/hammer1.webp
id/tool gcompris categorization/resource/images/tools/hammer2.webp
id/tool gcompris categorization/resource/images/tools/hammer4.webp
id/tool gcompris categorization/resource/images/tools/hammer5.webp
id/tool gcompris categorization/resource/images/tools/hammer6.webp
id/tool gcompris categorization/resource/images/tools/plier1.webp
id/tool gcompris categorization/resource/images/tools/plier2.webp
id/tool gcompris categorization/resource/images/tools/plier3.webp
id/tool gcompris categorization/resource/images/tools/cuttingTool.webp
id/tool gcompris categorization/resource/images/tools/screwDriver1.webp
id/tool gcompris categorization/resource/images/tools/screwDriver2.webp
id/tool gcompris categorization/resource/images/tools/screwDriver3.webp
id/tool gcompris categorization/resource/images/tools/wrench.webp
id/tool gcompris categorization/resource/images/tools/wrench1.webp
id/tool gcompris categorization/resource/images/tools/scissors1.webp
id/tool gcompris categorization/resource/images/tools/scissors2.webp
id/tool gcompris categorization/resource/images/tools/measuringTape1.webp
id/tool gcompris categorization/resource/images/tools/sideCutter1.webp
id/tool tuxpaint household/tools/hammer.png
id/tool tuxpaint household/tools/mallet_metal.png
id/tool tuxpaint household/tools/saw.png
id/tool tuxpaint household/tools/plyers.png
id/tool tuxpaint household/tools/wrench_plumbers.png
id/tool tuxpaint household/tools/spade.png

ood/textures gimp Animal/leather.pat
ood/textures gimp Animal/leopard.pat
ood/textures gimp Fabric/burlap.pat
ood/textures gimp Food/java.pat
ood/textures gimp Legacy/fibers.pat
ood/textures gimp Paper/crinklepaper.pat
ood/textures gimp Stone/Craters.pat
ood/textures gimp Stone/amethyst.pat
ood/textures gimp Stone/brick.pat
ood/textures gimp Stone/cracked.pat
ood/textures gimp Stone/granite1.pat
ood/textures gimp Stone/ground1.pat
ood/textures gimp Stone/marble1.pat
ood/textures gimp Stone/pink_marble.pat
ood/textures gimp Stone/rock.pat
ood/textures gimp Stone/slate.pat
ood/textures gimp Stone/stone33.pat
ood/textures gimp Stone/terra.pat
ood/textures gimp Water/ice.pat
ood/textures gimp Wood/bark.pat
ood/textures gimp Wood/burlwood.pat
ood/textures gimp Wood/corkboard.pat
ood/textures gimp Wood/parque1.pat
ood/textures gimp Wood/walnut.pat
ood/textures gimp Wood/wood1.pat
ood/textures gimp Wood/wood5.pat
ood/textures skimage brick.png
ood/textures skimage grass.png
ood/textures skimage gravel.png
ood/textures mypaint ramon/HR_Cork.png
ood/textures mypaint ramon/HR_Canvas 01.png
ood/textures mypaint ramon/HR_DecoPaper.png

ood/places gcompris categorization/resource/images/monuments/IndiaGate.webp
ood/places gcompris categorization/resource/images/monuments/arcDeTriomphe.webp
ood/places gcompris categorization/resource/images/monuments/bayterek.webp
ood/places gcompris categorization/resource/images/monuments/brandenburgGate.webp
ood/places gcompris categorization/resource/images/monuments/burj.webp
ood/places gcompris categorization/resource/images/monuments/cathedral.webp
ood/places gcompris categorization/resource/images/monuments/christTheRedeemer.webp
ood/places gcompris categorization/resource/images/monuments/colosseum.webp
ood/places gcompris categorization/resource/images/monuments/eiffelTower.webp
ood/places gcompris categorization/resource/images/monuments/empireState.webp
ood/places gcompris categorization/resource/images/monuments/greatPyramid.webp
ood/places gcompris categorization/resource/images/monuments/greatWall.webp
ood/places gcompris categorization/resource/images/monuments/jucheTower.webp
ood/places gcompris categorization/resource/images/monuments/kutubMinar.webp
ood/places gcompris categorization/resource/images/monuments/leMusee.webp
ood/places gcompris categorization/resource/images/monuments/leaningTowerOfPisa.webp
ood/places gcompris categorization/resource/images/monuments/monument1.webp
ood/places gcompris categorization/resource/images/monuments/monument2.webp
ood/places gcompris categorization/resource/images/monuments/monument3.webp
ood/places gcompris categorization/resource/images/monuments/mountRushmore.webp
ood/places gcompris categorization/resource/images/monuments/operaHouse.webp
ood/places gcompris categorization/resource/images/monuments/parthenon.webp
ood/places gcompris categorization/resource/images/monuments/statueOfLiberty.webp
ood/places gcompris categorization/resource/images/monuments/tajMahal.webp
ood/places gcompris categorization/resource/images/monuments/usCapitol.webp
ood/places gcompris categorization/resource/images/monuments/victoriaMemorial.webp
ood/places gcompris categorization/resource/images/monuments/zimniPalace.webp
ood/places gcompris details/resource/image/Chenonceau_background.webp
ood/places gcompris details/resource/image/EgeskovSlotSpejling_background.webp
ood/places gcompris details/resource/image/EilanDonanCastle_background.webp
ood/places gcompris details/resource/image/FanoeWindmill_background.webp
ood/places gcompris details/resource/image/Louvre_2007_02_24_c_background.webp
ood/places gcompris details/resource/image/NDP_background.webp
ood/places gcompris details/resource/image/Nagoya_background.webp
ood/places gcompris details/resource/image/Neuschwanstein_background.webp
ood/places gcompris details/resource/image/TowerBridgeLondon_background.webp

ood/other_animals tuxpaint animals/insects/Brown_slug.png
ood/other_animals tuxpaint animals/insects/Woodlouse.png
ood/other_animals tuxpaint animals/insects/grasshopper.png
ood/other_animals tuxpaint animals/insects/hornet.png
ood/other_animals tuxpaint animals/insects/hoverfly.png
ood/other_animals tuxpaint animals/insects/mantis.png
ood/other_animals tuxpaint animals/insects/xanthia.png
ood/other_animals tuxpaint animals/amphibians/frog-1.png
ood/other_animals tuxpaint animals/amphibians/frog.png
ood/other_animals tuxpaint animals/lizards/iguana.png
ood/other_animals tuxpaint animals/shellfish/abalone.png
ood/other_animals tuxpaint animals/shellfish/murray-mussel.png
ood/other_animals tuxpaint animals/fish/lobster.png
ood/other_animals tuxpaint animals/fish/shrimp.png
ood/other_animals gcompris erase/resource/bee.webp
ood/other_animals gcompris erase/resource/butterfly.webp
ood/other_animals gcompris erase/resource/caterpillar.webp
ood/other_animals gcompris erase/resource/chamaeleon.webp
ood/other_animals gcompris erase/resource/crab.webp
ood/other_animals gcompris explore_world_animals/resource/animals/crocodile.webp
ood/other_animals gcompris explore_world_animals/resource/animals/dragon.webp
"""

SHORT_SIDE = 256
JPEG_QUALITY = 90
TILE = 256
MARGIN = 0.06


# ----------------------------------------------------------------------------------------------
# Readers for the two container formats Pillow does not know.
# ----------------------------------------------------------------------------------------------


def read_rcc(path: Path) -> dict[str, bytes]:
    """All files of a Qt resource bundle (`rcc` binary format, versions 1-3), by resource path.

    Layout (qtbase src/corelib/io/qresource.cpp): header `qres`, version, then offsets of the
    tree, the data and the names. Tree nodes are 14 bytes (v1) or 22 bytes (v2+, with a
    modification time): name offset u32, flags u16 (1 zlib, 2 directory, 4 zstd), then either
    child count u32 + first child index u32, or locale u32 + data offset u32. A data entry is a
    u32 length and the bytes; zlib data starts with a u32 uncompressed length (qCompress).
    A name is a u16 length, a u32 hash and UTF-16BE text.
    """
    b = path.read_bytes()
    if b[:4] != b"qres":
        raise ValueError(f"{path}: not a Qt rcc file")
    version, tree, data, names = struct.unpack(">IIII", b[4:20])
    node = 14 if version == 1 else 22

    def name(off: int) -> str:
        (n,) = struct.unpack(">H", b[names + off : names + off + 2])
        return b[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    out: dict[str, bytes] = {}

    def walk(index: int, prefix: str) -> None:
        o = tree + index * node
        name_off, flags = struct.unpack(">IH", b[o : o + 6])
        path_here = f"{prefix}/{name(name_off)}" if index else ""
        if flags & 2:
            count, child = struct.unpack(">II", b[o + 6 : o + 14])
            for i in range(count):
                walk(child + i, path_here)
            return
        (doff,) = struct.unpack(">I", b[o + 10 : o + 14])
        (length,) = struct.unpack(">I", b[data + doff : data + doff + 4])
        raw = b[data + doff + 4 : data + doff + 4 + length]
        if flags & 1:
            raw = zlib.decompress(raw[4:])
        elif flags & 4:
            raise ValueError(f"{path}: zstd-compressed entry {path_here} is not supported")
        out[path_here] = raw

    walk(0, "")
    return out


def read_gimp_pattern(path: Path) -> Image.Image:
    """A GIMP `.pat` pattern (GIMP devel-docs/pat.txt): a big-endian header (header size,
    version, width, height, bytes per pixel, magic `GPAT`, name) then raw 8-bit pixels."""
    b = path.read_bytes()
    header, _version, w, h, bpp = struct.unpack(">5I", b[:20])
    if b[20:24] != b"GPAT":
        raise ValueError(f"{path}: not a GIMP pattern")
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[bpp]
    return Image.frombytes(mode, (w, h), b[header : header + w * h * bpp])


# ----------------------------------------------------------------------------------------------
# Downloads.
# ----------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(pkg: str, version: str, want_sha: str, cache: Path) -> tuple[Path, str, str]:
    """Download (once) and unpack a Debian package; returns (root, version, sha256)."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        r = subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=debs)
        if r.returncode != 0:
            print(f"warning: {pkg}={version} is no longer in the archive; taking the current one")
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
        found = sorted(debs.glob(f"{pkg}_*.deb"))
    deb = found[-1]
    got_version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    got_sha = sha256(deb)
    if got_sha != want_sha:
        print(f"warning: {deb.name}: sha256 {got_sha} differs from the one this demo was made from")
    root = cache / "x" / pkg
    if not root.is_dir():
        tmp = cache / "x" / f".{pkg}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(root)
    return root, got_version, got_sha


def fetch_wheel(cache: Path) -> tuple[zipfile.ZipFile, str]:
    """Download (once) the pinned scikit-image wheel (the same file whatever the local Python)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / WHEEL["file"]
    if not path.exists():
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                "--implementation", "cp", "--abi", "cp311",
                "-d", str(wheels), f"{WHEEL['name']}=={WHEEL['version']}",
            ],
            check=True,
        )
    got = sha256(path)
    if got != WHEEL["sha256"]:
        print(f"warning: {path.name}: sha256 {got} differs from the one this demo was made from")
    return zipfile.ZipFile(path), got


# ----------------------------------------------------------------------------------------------
# Attribution for gcompris files: each image folder ships a README of stanzas
#   Copyright: … / Source: … / License: … / Comment(s): … / Files: <names, one a line>
# ----------------------------------------------------------------------------------------------


IMAGE_NAME = re.compile(r"^[^\s:]+\.(webp|png|jpe?g|svg)$")


def parse_gcompris_readme(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        files: list[str] = []
        in_files = False
        for line in stanza.splitlines():
            m = re.match(r"^(Copyright|Source|License|Comments?|Files):\s*(.*)$", line.strip())
            if m:
                key, value = m.group(1), m.group(2).strip()
                in_files = key == "Files"
                if in_files:
                    files += value.split()
                else:
                    fields["Comment" if key.startswith("Comment") else key] = value
            elif in_files and line.strip() or IMAGE_NAME.match(line.strip()):
                # some stanzas list their files without a `Files:` line
                files += line.split()
        for f in files:
            out[f] = fields
    return out


# ----------------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------------


def normalise_licence(text: str) -> str:
    """One spelling per licence: `CC-BY-SA 4.0` -> `CC-BY-SA-4.0`, `Public domain` ->
    `public-domain` (the spellings of Debian copyright files)."""
    text = re.sub(r"^(CC-BY(?:-SA)?) (\d)", r"\1-\2", text.strip())
    return "public-domain" if text.lower() == "public domain" else text


def flatten(im: Image.Image) -> tuple[Image.Image, bool]:
    """RGB image; a cut-out with transparency is cropped to its opaque part (plus a margin)
    and composited on white. Returns (image, was_composited)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "RGBA", "PA"):
        im = im.convert("RGBA")
        alpha = im.getchannel("A")
        if alpha.getextrema()[0] < 255:
            box = alpha.getbbox()
            if box is None:
                raise ValueError("fully transparent image")
            x0, y0, x1, y1 = box
            m = round(MARGIN * max(x1 - x0, y1 - y0))
            canvas = Image.new("RGBA", (x1 - x0 + 2 * m, y1 - y0 + 2 * m), (255, 255, 255, 255))
            canvas.alpha_composite(im.crop(box), (m, m))
            return canvas.convert("RGB"), True
    return im.convert("RGB"), False


def downscale(im: Image.Image) -> Image.Image:
    w, h = im.size
    short = min(w, h)
    if short <= SHORT_SIDE:
        return im
    scale = SHORT_SIDE / short
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.LANCZOS)


def tile(im: Image.Image) -> Image.Image:
    out = Image.new(im.mode, (TILE, TILE))
    for y in range(0, TILE, im.height):
        for x in range(0, TILE, im.width):
            out.paste(im, (x, y))
    return out


def out_name(source: str, path: str) -> str:
    stem = Path(path).stem
    if source == "gcompris" and stem.endswith("_background"):
        stem = stem[: -len("_background")]
    stem = re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_").lower()
    return f"{source}_{stem}.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", type=Path, default=repo / "demo")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/setar-demo-cache"))
    args = ap.parse_args()

    entries = [line.split(" ", 2) for line in MANIFEST.strip().splitlines() if line.strip()]
    used = {src for _, src, _ in entries}
    roots: dict[str, Path] = {}
    provenance: dict[str, tuple[str, str]] = {}  # package -> (version, sha256)
    for key in sorted(used - {"skimage"}):
        pkg = SOURCES[key][0]
        root, version, digest = fetch_deb(pkg, *DEBS[pkg], args.cache)
        roots[key] = root
        provenance[pkg] = (version, digest)
    wheel, digest = fetch_wheel(args.cache)
    provenance[WHEEL["name"]] = (WHEEL["version"], digest)

    rcc_cache: dict[str, dict[str, bytes]] = {}
    readmes: dict[str, dict[str, dict[str, str]]] = {}

    def gcompris(path: str) -> tuple[bytes, dict[str, str]]:
        activity = path.split("/", 1)[0]
        if activity not in rcc_cache:
            rcc = roots["gcompris"] / "usr/share/gcompris-qt/rcc" / f"{activity}.rcc"
            rcc_cache[activity] = read_rcc(rcc)
        files = rcc_cache[activity]
        full = f"/gcompris/src/activities/{path}"
        folder = full.rsplit("/", 1)[0]
        if folder not in readmes:
            readme = files.get(f"{folder}/README", b"").decode("utf-8")
            readmes[folder] = parse_gcompris_readme(readme)
        return files[full], readmes[folder].get(Path(path).name, {})

    tmp_out = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    rows = []
    per_dest: dict[str, int] = {}
    composited = 0
    for dest, source, path in entries:
        pkg, where, licence = SOURCES[source]
        attribution: dict[str, str] = {}
        kind = "photo"
        if source == "gcompris":
            raw, attribution = gcompris(path)
            im = Image.open(io.BytesIO(raw))
            rcc = where.replace("<activity>", path.split("/", 1)[0])
            original = f"{rcc}:/gcompris/src/activities/{path}"
        elif source == "gimp":
            im = read_gimp_pattern(roots[source] / where / path)
            original = where + path
        elif source == "skimage":
            im = Image.open(io.BytesIO(wheel.read(where + path)))
            original = where + path
        else:
            im = Image.open(roots[source] / where / path)
            original = where + path
        im.load()
        im, was_cut_out = flatten(im)
        if source == "gimp":
            im = tile(im)
            kind = "tiled"
        else:
            im = downscale(im)
        if was_cut_out:
            kind = "cut-out on white"
            composited += 1
        index = per_dest.get(dest, 0)
        per_dest[dest] = index + 1
        if dest.startswith("id/"):
            split = "val" if index % 3 == 0 else "test"
            rel = Path("id") / split / dest[3:] / out_name(source, path)
        else:
            rel = Path(dest) / out_name(source, path)
        target = tmp_out / rel
        if target.exists():
            raise SystemExit(f"two manifest lines give {rel}")
        target.parent.mkdir(parents=True, exist_ok=True)
        im.save(target, "JPEG", quality=JPEG_QUALITY, optimize=True)
        lic = normalise_licence(attribution.get("License") or licence or "")
        author = attribution.get("Copyright", "")
        url = attribution.get("Source", "")
        note = attribution.get("Comment", "")
        rows.append(
            (str(rel), pkg, provenance[pkg][0], original, lic, author, url, note, kind, im.size)
        )

    classes = sorted({d[3:] for d, _, _ in entries if d.startswith("id/")})
    ood_sets = sorted({d[4:] for d, _, _ in entries if d.startswith("ood/")})
    (tmp_out / "labels.txt").write_text("".join(c.replace("_", " ") + "\n" for c in classes))
    with open(tmp_out / "SOURCES.tsv", "w") as f:
        f.write(
            "file\tpackage\tversion\toriginal\tlicense\tcopyright\tsource\tcomment"
            "\tconversion\tsize\n"
        )
        for rel, pkg, ver, orig, lic, author, url, note, kind, (w, h) in rows:
            cells = [rel, pkg, ver, orig, lic, author, url, note, kind, f"{w}x{h}"]
            f.write("\t".join(c.replace("\t", " ") for c in cells) + "\n")

    def count(prefix: str) -> int:
        return sum(1 for r in rows if r[0].startswith(prefix))

    total_bytes = sum((tmp_out / r[0]).stat().st_size for r in rows)
    write_readme(tmp_out, rows, classes, ood_sets, count, provenance, composited, total_bytes)

    shutil.rmtree(args.out, ignore_errors=True)
    tmp_out.rename(args.out)
    print(f"wrote {len(rows)} images ({total_bytes / 1e6:.2f} MB) to {args.out}")
    for c in classes:
        print(f"  id {c:10s} val {count(f'id/val/{c}/'):3d} test {count(f'id/test/{c}/'):3d}")
    for s in ood_sets:
        print(f"  ood {s:14s} {count(f'ood/{s}/'):3d}")


def write_readme(out, rows, classes, ood_sets, count, provenance, composited, total_bytes) -> None:
    lic_count: dict[str, int] = {}
    for r in rows:
        lic_count[r[4]] = lic_count.get(r[4], 0) + 1
    lines = [
        "# Demo benchmark",
        "",
        "A small, real out-of-distribution benchmark that `setar-engine run` uses when it is given",
        "no data: photos and textures that Debian and PyPI packages ship, picked by an explicit",
        "list and converted by `scripts/make_demo_data.py` (do not edit these files by hand;",
        "change the list in the script and run it again). It is a smoke test of the whole",
        "pipeline on real images, far too small for numbers to compare with the paper.",
        "",
        "## Layout",
        "",
        "```",
        "id/val/<class>/*.jpg    ID images the search uses (ImageFolder layout)",
        "id/test/<class>/*.jpg   ID images of the final evaluation",
        "ood/<set>/*.jpg         OOD sets",
        "labels.txt              class names, one a line, in ImageFolder order (sorted folders)",
        "SOURCES.tsv             every image: package, version, original path, licence,",
        "                        copyright holder, source page, comment, conversion, size",
        "```",
        "",
        'Class names are the folder names, so the prompts are "a photo of a bird" etc.',
        "",
        "## ID classes",
        "",
        "| class | val | test | from |",
        "|---|---|---|---|",
    ]
    for c in classes:
        srcs = sorted({r[1] for r in rows if r[0].split("/")[2] == c and r[0].startswith("id/")})
        lines.append(
            f"| {c} | {count(f'id/val/{c}/')} | {count(f'id/test/{c}/')} | {', '.join(srcs)} |"
        )
    lines.append(f"| **all** | {count('id/val/')} | {count('id/test/')} | |")
    lines += ["", "## OOD sets", "", "| set | images | from |", "|---|---|---|"]
    what = {
        "textures": "GIMP pattern tiles, MyPaint scanned paper/cork, scikit-image "
        "brick/grass/gravel",
        "places": "landmark and building photos (GCompris `categorization`, `details`)",
        "other_animals": "insects, slug, woodlouse, frogs, lizards, crocodile, shellfish "
        "(Tux Paint, GCompris): animals of no ID class, near OOD",
    }
    for s in ood_sets:
        lines.append(f"| {s} | {count(f'ood/{s}/')} | {what.get(s, '')} |")
    lines += [
        "",
        f"{len(rows)} images, {total_bytes / 1e6:.2f} MB in all. Short sides run from 58 px",
        "(thin Tux Paint stamps such as the moonwrasse) to 256 px.",
        "",
        "## How it was made",
        "",
        "- Split: within each class, the 1st, 4th, 7th, … listed image goes to `val`, the others",
        "  to `test` (a class with two sources lists both, so both splits mix them).",
        f"- {composited} images are RGBA cut-outs (Tux Paint stamps): cropped to their opaque part",
        f"  plus a {round(MARGIN * 100)} % margin and composited on white.",
        f"- Downscaled (Lanczos) to a short side of at most {SHORT_SIDE} px, never upscaled, so",
        "  small stamps stay small (their longer side about 100-250 px).",
        f"- GIMP patterns are 20-156 px seamless tiles: tiled (not resampled) to {TILE} x {TILE}.",
        f"- Saved as RGB JPEG, quality {JPEG_QUALITY}, with Pillow {PIL.__version__}.",
        "- Left out on purpose: stamps whose opaque part is under about 100 px on its longer",
        "  side (most of Tux Paint's vegetables and small fruits), drawings and `cartoon/`",
        "  stamps, GCompris word pictures (drawings), the Van Gogh paintings among the `details`",
        "  pictures, landmarks that occur twice.",
        "",
        "Sources (all from the registries this project can reach):",
        "",
        "| package | version | sha256 of the archive |",
        "|---|---|---|",
    ]
    for pkg, (ver, digest) in sorted(provenance.items()):
        lines.append(f"| {pkg} | {ver} | `{digest[:16]}…` |")
    lines += [
        "",
        "Regenerate (Debian/Ubuntu with `apt-get`, `dpkg-deb`, `pip`, Pillow with WebP, and",
        "access to the Debian archive and PyPI; the same Pillow gives the same bytes):",
        "",
        "```",
        "python3 scripts/make_demo_data.py            # writes demo/, caches downloads in /tmp",
        "```",
        "",
        "## Licences",
        "",
        "Per image in `SOURCES.tsv`; the packages' copyright files are quoted in",
        "`assets/LICENSES.md`. Counts:",
        "",
    ]
    for lic, n in sorted(lic_count.items(), key=lambda kv: -kv[1]):
        lines.append(f"- {lic}: {n}")
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
