"""A stand-in for "your own images with captions" (README, "Measured on data that is not shapes").

Writes my_images/{train,val}/NNNNN.png + NNNNN.txt: 32 px pictures of stripes, checkerboards and diagonal splits in
two of six colours, captioned in free words that the shapes parser does not read. Run: python scripts/make_stripes.py
"""

import random
from pathlib import Path

from PIL import Image

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
PATTERNS = ("horizontal stripes", "vertical stripes", "a checkerboard", "a diagonal split")


def covered(pattern: str, x: int, y: int, width: int) -> bool:
    return {
        "horizontal stripes": (y // width) % 2 == 1,
        "vertical stripes": (x // width) % 2 == 1,
        "a checkerboard": (x // width + y // width) % 2 == 1,
        "a diagonal split": x > y,
    }[pattern]


def main(root: str = "my_images") -> None:
    rng = random.Random(0)
    for split, n in (("train", 3000), ("val", 600)):
        out = Path(root) / split
        out.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a, b = rng.sample(list(COLOURS), 2)
            pattern = rng.choice(PATTERNS)
            width = rng.choice([4, 8])
            image = Image.new("RGB", (32, 32), COLOURS[a])
            for y in range(32):
                for x in range(32):
                    if covered(pattern, x, y, width):
                        image.putpixel((x, y), COLOURS[b])
            if "stripes" in pattern:
                pattern = pattern.replace("stripes", ("thin " if width == 4 else "wide ") + "stripes")
            image.save(out / f"{i:05d}.png")
            (out / f"{i:05d}.txt").write_text(f"{pattern} in {a} and {b}")


if __name__ == "__main__":
    main()
