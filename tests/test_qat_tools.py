"""tools/ocr_lines.py (train / eval .npz files from tools/ocr_data's renderer) and tools/qat_accuracy.py (fp32 vs
PTQ vs QAT on the compiled int8 libraries, with latency)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))


def test_ocr_lines_writes_distinct_train_and_eval_files(tmp_path):
    pytest.importorskip("PIL")
    import ocr_data
    import ocr_lines
    assert ocr_lines.main([str(tmp_path), "--train", "3", "--eval", "2"]) == 0
    train, evaluation = np.load(tmp_path / "train.npz"), np.load(tmp_path / "eval.npz")
    assert train["x"].shape == (3, 3, 48, 320) and evaluation["x"].shape == (2, 3, 48, 320)
    assert train["x"].dtype == np.float32 and -1.0 <= train["x"].min() and train["x"].max() <= 1.0
    texts = (tmp_path / "train.txt").read_text(encoding="utf-8").splitlines()
    assert texts == ocr_data.render_lines(3, ocr_lines.SEEDS["train"])[1]
    assert (tmp_path / "eval.txt").read_text(encoding="utf-8").splitlines() != texts[:2]
    assert not np.array_equal(train["x"][:2], evaluation["x"])


def test_ocr_text_is_real_catalog_phrases_the_recognizer_can_read():
    import ocr_data
    zh, en = ocr_data.catalog_corpus()
    if not zh:
        pytest.skip("no zh_CN message catalogs installed (tools/setup.sh installs iso-codes)")
    chars = set(ocr_data.dictionary())
    rng = np.random.default_rng(0)
    texts = [ocr_data.catalog_text(rng) for _ in range(300)]
    assert all(c in chars or c == " " for t in texts for c in t)
    cjk = [t for t in texts if not t.isascii()]
    latin = [t for t in texts if t.isascii() and any(c.isalpha() for c in t)]
    assert len(cjk) > 60 and len(latin) > 60
    assert all(2 <= len(t) <= 10 and any(t in p for p in zh) for t in cjk)          # runs of real translations
    assert all(len(t) <= 16 and t == t.strip() for t in latin)
    assert ocr_data.render_lines(2, 0, source="random")[1] != ocr_data.render_lines(2, 0)[1]


def test_qat_accuracy_reports_accuracy_and_latency(tmp_path, capsys):
    import qat_accuracy
    out = tmp_path / "r.json"
    assert qat_accuracy.main(["--model", "digits-cnn", "--epochs", "1", "--repeat", "3", "--out",
                              str(tmp_path / "work"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = ["fp32 (onnxruntime)", "PTQ int8 (compiled)", "QAT int8 (compiled)"]
    assert list(r["rows"]) == rows and list(r["latency_ms"]) == rows
    assert r["rows"]["fp32 (onnxruntime)"]["top1"] > 0.9
    assert all(0 < r["rows"][k]["top1"] <= 1 and r["latency_ms"][k] > 0 for k in rows)
    assert r["quantization"]["qat"] and r["quantization"]["trained_tensors"] >= 3
    assert list(r["float_qdq"]) == ["PTQ int8 (onnxruntime, float QDQ)", "QAT int8 (onnxruntime, float QDQ)"]
    assert all(0 < v["top1"] <= 1 for v in r["float_qdq"].values())
    assert "| QAT int8 (compiled) |" in capsys.readouterr().out


def test_qat_accuracy_without_qat_compares_quantize_settings(tmp_path, capsys):
    """--no-qat: the fp32 and PTQ rows only, with the quantize options given (ops=compute here)."""
    import qat_accuracy
    out = tmp_path / "r.json"
    assert qat_accuracy.main(["--model", "digits-cnn", "--no-qat", "--quantize", "ops=compute", "--repeat", "3",
                              "--out", str(tmp_path / "work"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["rows"]) == ["fp32 (onnxruntime)", "PTQ int8 (compiled)"] and r["quantize"].endswith("ops=compute")
    assert list(r["float_qdq"]) == ["PTQ int8 (onnxruntime, float QDQ)"] and r["qat_training_seconds"] is None
    assert r["rows"]["PTQ int8 (compiled)"]["top1"] > 0.9 and r["seed"] == 0
    assert "QAT" not in capsys.readouterr().out


def test_digits_mobilenet_is_the_same_model_on_every_run(tmp_path):
    """qat_accuracy's digits-mobilenet is trained by the tool: seeded, so its fp32 accuracy repeats run to run."""
    import onnx
    sys.path.insert(0, str(TOOLS.parent / "tests"))
    from targets.test_cpu_int8 import _train_mobilenet_v2_digits
    for name in ("a.onnx", "b.onnx"):
        _train_mobilenet_v2_digits(tmp_path / name, epochs=1)
    a, b = (onnx.load(str(tmp_path / n)).graph.initializer for n in ("a.onnx", "b.onnx"))
    assert [t.SerializeToString() for t in a] == [t.SerializeToString() for t in b]


@pytest.mark.parametrize("setting, says", [("decisions", "malformed; write KEY=VALUE"),
                                           ("nosuch=1", "unknown key 'nosuch'")])
def test_qat_accuracy_refuses_bad_schedule_settings_in_one_line(setting, says, capsys):
    import qat_accuracy
    assert qat_accuracy.main(["--schedule", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err
