"""A real image-caption data set at 64 px that this project did not make: the Noto Color Emoji, drawn by people
(Google's Noto designers; images under the Apache 2.0 licence, the font under the SIL Open Font License 1.1), each
captioned with its Unicode CLDR short name, written by people ("grinning face with smiling eyes", "woman
technologist: medium skin tone", "flag: Japan"). Both come from the package registries:

    apt-get install fonts-noto-color-emoji    # the images (Debian's package of Google's font)
    pip install emoji                         # the names (the emoji package's copy of Unicode's CLDR data)
    python scripts/make_emoji.py --out data/emoji_images
    mmdiff data folder --src data/emoji_images/train --out data/emoji/train
    mmdiff data folder --src data/emoji_images/val --out data/emoji/val

Every fully-qualified emoji the font draws is rendered once at the font's bitmap size (136 x 128), composited on
white, its drawn area centred in a square and resized to --size with Lanczos. A seeded 10 % is held out (whole
emoji, so held-out images are ones the model never saw). The folder is image + same-named .txt, what `mmdiff data
folder` reads.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FULLY_QUALIFIED = 2  # the emoji package's status code for a fully-qualified sequence
BITMAP_SIZE = 109  # the one size NotoColorEmoji's bitmaps come at


def caption(short_name: str) -> str:
    """ ":woman_technologist_medium_skin_tone:" -> "woman technologist medium skin tone" (lowercase words)."""
    return re.sub(r"\s+", " ", short_name.strip(":").replace("_", " ").replace("-", " ")).strip().lower()


def render(text: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """The emoji on white, its drawn area centred in a square, at size x size; None when the font has no glyph."""
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    drawn = canvas.crop(box)
    side = max(drawn.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(drawn, ((side - drawn.width) // 2, (side - drawn.height) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train/ and val/ (image + .txt)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import emoji
    except ImportError:
        print("make_emoji: error: the emoji names come from the emoji package: pip install emoji", file=sys.stderr)
        return 2
    if not FONT.is_file():
        print(f"make_emoji: error: {FONT} is missing: apt-get install fonts-noto-color-emoji", file=sys.stderr)
        return 2
    font = ImageFont.truetype(str(FONT), BITMAP_SIZE)
    items = sorted(
        (data["en"], text) for text, data in emoji.EMOJI_DATA.items() if data.get("status") == FULLY_QUALIFIED
    )
    random.Random(args.seed).shuffle(items)
    out = Path(args.out)
    counts = {"train": 0, "val": 0, "no_glyph": 0}
    num_val = round(len(items) * args.val_fraction)
    for index, (name, text) in enumerate(items):
        image = render(text, font, args.size)
        if image is None:
            counts["no_glyph"] += 1
            continue
        split = "val" if index < num_val else "train"
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{index:05d}"
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(caption(name) + "\n", encoding="utf-8")
        counts[split] += 1
    print(f"wrote {counts['train']} train and {counts['val']} val images to {out} ({counts['no_glyph']} not drawn)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
