"""Real OCR data rendered with fonts from Debian packages (fonts-dejavu-core, fonts-liberation2, fonts-wqy-microhei;
tools/setup.sh installs them): text lines for a recognizer and pages for a text detector, at varied sizes, with
noise, blur, contrast and slight rotation. No downloads; seeded.

    lines = render_lines(n, seed)   -> {"x": float32 [n, 3, 48, 320] in PP-OCR's normalization}, texts
    pages = render_pages(n, seed)   -> {"x": float32 [n, 3, H, W]}

Text (`source="catalogs"`, the default): real phrases, the Chinese translations and the English originals of the
zh_CN message catalogs of core Debian packages (coreutils, dpkg, bash, tar, libc, iso-codes' country, region,
language and currency names ...; CATALOG_DOMAINS), cut into lines of 2-10 Chinese characters or up to 16 Latin
characters of whole words, plus numbers and amounts. Only characters of the PP-OCRv4 recognizer's own dictionary
(read from the model's metadata) are kept, so every line is something the recognizer can read. `source="random"`
is the earlier generator (random draws from 36 invoice words and from the first 1500 characters of the dictionary,
which is not ordered by frequency: many are rare, and the teacher itself reads only half of those lines right).
Preprocessing follows PaddleOCR's: lines are resized to height 48 keeping the aspect ratio and padded on the right
to 320; pixels are scaled to [-1, 1] ((x / 255 - 0.5) / 0.5), RGB, channels first. Pages are normalized with ImageNet mean/std like the detector.

    .venv/bin/python tools/ocr_data.py --lines 8 --out /tmp/lines.png     # a contact sheet to look at
"""
from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation2",
             "/usr/share/fonts/truetype/liberation", "/usr/share/fonts/truetype/wqy")
CJK_FONT = "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"
LATIN = ("invoice total amount date order number customer address street city phone email account balance due "
         "payment received thank you page item quantity price tax discount shipping reference account code").split()
LINE_H, LINE_W = 48, 320
LOCALE_DIR = "/usr/share/locale/zh_CN/LC_MESSAGES"
CATALOG_DOMAINS = ("coreutils", "dpkg", "bash", "tar", "apt", "libapt-pkg6.0", "diffutils", "findutils", "sed", "grep",
                   "libc", "shadow", "iso_3166-1", "iso_3166-2", "iso_639-2", "iso_4217", "iso_15924")


def _fonts() -> tuple[list[str], list[str]]:
    """(Latin fonts, CJK fonts) installed on this machine."""
    latin = []
    for d in FONT_DIRS[:3]:
        p = Path(d)
        if p.is_dir():
            latin += sorted(str(f) for f in p.glob("*.ttf") if "Math" not in f.name and "ExtraLight" not in f.name)
    cjk = [CJK_FONT] if Path(CJK_FONT).is_file() else []
    if not latin and not cjk:
        raise SystemExit("ocr_data: no fonts found; install fonts-dejavu-core fonts-liberation2 fonts-wqy-microhei "
                         "(tools/setup.sh does)")
    return latin or cjk, cjk


@lru_cache(maxsize=1)
def dictionary() -> list[str]:
    """The PP-OCRv4 recognizer's characters (its CTC classes after the blank), from the model's metadata."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import onnx
    from test_third_party_models import model_path
    m = onnx.load(str(model_path("ch_PP-OCRv4_rec_infer.onnx")), load_external_data=False)
    chars = next(p.value for p in m.metadata_props if p.key == "character").splitlines()
    return chars


@lru_cache(maxsize=1)
def catalog_corpus() -> tuple[list[str], list[str]]:
    """(Chinese phrases, English phrases) of the zh_CN message catalogs in CATALOG_DOMAINS that are installed: the
    maximal runs of dictionary CJK characters (2+) of every translation, and the runs of plain words (letters,
    digits, spaces and ' , . -) of every English original. Sorted, so the draws depend only on the catalogs."""
    import gettext
    import re
    chars = set(dictionary())
    zh, en = set(), set()
    for domain in CATALOG_DOMAINS:
        path = Path(LOCALE_DIR) / f"{domain}.mo"
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        for key, value in catalog.items():
            key = key[0] if isinstance(key, tuple) else key
            if not isinstance(value, str) or not isinstance(key, str):
                continue
            zh.update(seg for seg in re.split(r"[^\u4e00-\u9fff]+", value)
                      if len(seg) >= 2 and all(c in chars for c in seg))
            key = re.sub(r"%[-#0 +'.*\d]*[hlLqjzt]*[A-Za-z%]", " ", key)       # printf conversions
            for seg in re.split(r"[^A-Za-z0-9 ',.-]+|\s{2,}", key):
                words = [w for w in seg.split() if re.match(r"[A-Za-z0-9]", w)]
                if any(re.fullmatch(r"[A-Za-z]{3,}\W?", w) for w in words) and all(c in chars for w in words for c in w):
                    en.add(" ".join(words))
    return sorted(zh), sorted(en)


def catalog_text(rng: np.random.Generator) -> str:
    """A line of real text (catalog_corpus): 2-10 consecutive Chinese characters of a translation, whole words of an
    English message (at most 16 characters), or a number / amount. Falls back to random_text when no catalog is
    installed (tools/setup.sh installs iso-codes)."""
    zh, en = catalog_corpus()
    if not zh or not en:
        return random_text(rng)
    kind = rng.random()
    if 0.35 <= kind < 0.6:
        return number_text(rng)
    if kind < 0.35:
        words = en[int(rng.integers(0, len(en)))].split()
        start = int(rng.integers(0, len(words)))
        text = words[start]
        for w in words[start + 1:]:
            if len(text) + 1 + len(w) > 16:
                break
            text += " " + w
        return text[:16]
    phrase = zh[int(rng.integers(0, len(zh)))]
    n = int(rng.integers(2, 11))
    start = int(rng.integers(0, max(1, len(phrase) - n + 1)))
    return phrase[start:start + n]


def number_text(rng: np.random.Generator) -> str:
    """3-9 digits, half of them an amount with two decimals."""
    text = "".join(str(d) for d in rng.integers(0, 10, rng.integers(3, 10)))
    return text[:-2] + "." + text[-2:] if rng.random() < 0.5 else text


def random_text(rng: np.random.Generator) -> str:
    """The earlier generator: a line of 3-14 characters, Latin invoice words, numbers, or random Chinese characters
    from the first 1500 of the dictionary (not ordered by frequency, as was assumed: many are rare, and the teacher
    decodes only about half of these lines as rendered)."""
    kind = rng.random()
    if kind < 0.35:
        words = [LATIN[i] for i in rng.integers(0, len(LATIN), rng.integers(1, 3))]
        text = " ".join(w.capitalize() if rng.random() < 0.3 else w for w in words)
    elif kind < 0.6:
        text = number_text(rng)
    else:
        chars = [c for c in dictionary()[:1500] if len(c) == 1 and not c.isascii()]
        text = "".join(chars[i] for i in rng.integers(0, len(chars), rng.integers(3, 10)))
    return text[:14]


def _render(text: str, font_path: str, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw, ImageFilter, ImageFont
    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    pad = int(size * 0.25)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = int(rng.integers(180, 256))
    fg = int(rng.integers(0, max(1, bg - 120)))
    im = Image.new("L", (max(w, 8), max(h, 8)), bg)
    ImageDraw.Draw(im).text((pad - left, pad - top), text, font=font, fill=fg)
    if rng.random() < 0.5:
        im = im.rotate(float(rng.uniform(-2.0, 2.0)), expand=False, fillcolor=bg)
    if rng.random() < 0.5:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.0))))
    a = np.asarray(im, np.float32)
    a = a + rng.normal(0, rng.uniform(0, 8), a.shape)
    return np.clip(a, 0, 255)


def line_tensor(gray: np.ndarray) -> np.ndarray:
    """PaddleOCR's recognizer preprocessing of one gray line image -> float32 [3, 48, 320]."""
    from PIL import Image
    h, w = gray.shape
    new_w = min(LINE_W, max(1, int(round(w * LINE_H / h))))
    im = Image.fromarray(gray.astype(np.uint8)).resize((new_w, LINE_H), Image.BILINEAR)
    out = np.zeros((LINE_H, LINE_W), np.float32)
    out[:, :new_w] = (np.asarray(im, np.float32) / 255.0 - 0.5) / 0.5
    return np.repeat(out[None], 3, axis=0)


TEXTS = {"catalogs": catalog_text, "random": random_text}


def render_lines(n: int, seed: int = 0, source: str = "catalogs") -> tuple[dict, list[str]]:
    """n text lines as the recognizer's input {"x": [n, 3, 48, 320]} and their texts (`source`: a TEXTS key)."""
    rng = np.random.default_rng(seed)
    latin, cjk = _fonts()
    draw = TEXTS[source]
    xs, texts = [], []
    for _ in range(n):
        text = draw(rng)
        ascii_only = all(c.isascii() for c in text)
        fonts = (latin + cjk) if ascii_only else (cjk or latin)
        font = fonts[int(rng.integers(0, len(fonts)))]
        xs.append(line_tensor(_render(text, font, int(rng.integers(20, 44)), rng)))
        texts.append(text)
    return {"x": np.stack(xs)}, texts


def render_pages(n: int, seed: int = 0, size: tuple[int, int] = (640, 640), lines: tuple[int, int] = (4, 12),
                 source: str = "catalogs") -> dict:
    """n pages with several text lines each, as the detector's input {"x": [n, 3, H, W]} (ImageNet mean/std)."""
    rng = np.random.default_rng(seed)
    draw = TEXTS[source]
    latin, cjk = _fonts()
    H, W = size
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    pages = []
    for _ in range(n):
        bg = float(rng.integers(200, 256))
        page = np.full((H, W), bg, np.float32) + rng.normal(0, rng.uniform(0, 6), (H, W))
        y = int(rng.integers(5, 40))
        for _ in range(int(rng.integers(*lines))):
            text = draw(rng)
            fonts = (latin + cjk) if all(c.isascii() for c in text) else (cjk or latin)
            img = _render(text, fonts[int(rng.integers(0, len(fonts)))], int(rng.integers(16, 40)), rng)
            h, w = img.shape
            if y + h >= H:
                break
            x = int(rng.integers(0, max(1, W - w)))
            w = min(w, W - x)
            region = page[y:y + h, x:x + w]
            page[y:y + h, x:x + w] = np.minimum(region, img[:, :w] + (bg - img.max()))
            y += h + int(rng.integers(4, 30))
        rgb = np.repeat(np.clip(page, 0, 255)[None] / 255.0, 3, axis=0)
        pages.append(((rgb - mean) / std).astype(np.float32))
    return {"x": np.stack(pages)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=8)
    ap.add_argument("--pages", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="PNG contact sheet")
    args = ap.parse_args()
    from PIL import Image
    if args.pages:
        x = render_pages(args.pages, args.seed)["x"][:, 0]
        x = x * 0.229 + 0.485
    else:
        data, texts = render_lines(args.lines, args.seed)
        x = data["x"][:, 0] * 0.5 + 0.5
        print("\n".join(texts))
    sheet = np.concatenate(list(x), axis=0)
    Image.fromarray((np.clip(sheet, 0, 1) * 255).astype(np.uint8)).save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
