"""Data from folders and text files through a preprocessing hook (issue 15, item 2), and compress on unlabeled
data: the report gives agreement with the teacher instead of accuracy."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from graphopt.cli import main  # noqa: E402
from graphopt.errors import BadInput  # noqa: E402
from graphopt.folder_data import load_folder, load_hook  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

HOOK = '''
import numpy as np
from PIL import Image

def image(path):
    im = np.asarray(Image.open(path), np.float32) / 255.0 * 16.0          # digits pixels are 0..16
    return {"x": im[None]}

def line(text):
    return np.array([float(v) for v in text.split()], np.float32).reshape(1, 8, 8)

def broken(path):
    raise ValueError("cannot decode " + path.name)
'''


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image
    x, _, _, _ = digits.load_digits_split()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(96):
        Image.fromarray(np.clip(x[i, 0] / 16.0 * 255.0, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    (tmp_path / "prep.py").write_text(HOOK)
    return folder


def test_images_and_lines_through_the_hook(tmp_path, image_folder):
    x, _, _, _ = digits.load_digits_split()
    got = load_folder(image_folder, load_hook(f"{tmp_path}/prep.py:image"), ["x"], "--train")
    assert got["x"].shape == (96, 1, 8, 8)
    assert np.abs(got["x"] - x[:96]).max() <= 16.0 / 255.0            # 8-bit PNG rounding
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(" ".join(str(v) for v in x[i].reshape(-1)) for i in range(5)) + "\n\n")
    got = load_folder(lines, load_hook(f"{tmp_path}/prep.py:line"), ["x"], "--train")
    np.testing.assert_allclose(got["x"], x[:5], rtol=1e-6)


def test_hook_errors_are_one_line(tmp_path, image_folder):
    with pytest.raises(BadInput, match="example 0 .*'000.png'.*cannot decode 000.png"):
        load_folder(image_folder, load_hook(f"{tmp_path}/prep.py:broken"), ["x"], "--train")
    with pytest.raises(BadInput, match="has no function 'nope'"):
        load_hook(f"{tmp_path}/prep.py:nope")
    with pytest.raises(BadInput, match="FILE.py:FUNCTION"):
        load_hook("prep")
    with pytest.raises(BadInput, match="more than the"):
        load_folder(image_folder, load_hook(f"{tmp_path}/prep.py:image"), ["x"], "--train", max_bytes=1000)


def test_compress_on_an_unlabeled_image_folder_reports_agreement(tmp_path, capsys, image_folder):
    out = tmp_path / "student.onnx"
    rc = main(["compress", str(digits.teacher_path()), "--train", str(image_folder), "--eval", str(image_folder),
               "--preprocess", f"{tmp_path}/prep.py:image", "--pipeline", "cleanup,prune-channels{flops=0.9}",
               "--epochs", "6", "--batch-size", "16", "-o", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    import json
    info = json.loads(capsys.readouterr().out)
    final = info["final"]
    assert final["top1"] is None and final["task"] == "classifier"
    assert final["agreement_metric"] == "top1_agreement" and 0.8 <= final["agreement"] <= 1.0
    assert out.is_file()
