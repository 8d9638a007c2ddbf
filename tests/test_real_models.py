"""The registry of real third-party models (tests/real_models.py): every registered file is installed by
tools/setup.sh, its generated inputs fit the model (names, dtypes, bound shapes) and onnxruntime runs them, and the
inputs are realistic enough that the models do their job on them."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import real_models as rm

pytestmark = pytest.mark.fast

_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _session(m):
    return ort.InferenceSession(str(m.path()), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(rm.MODELS))
def test_inputs_fit_the_model_and_onnxruntime_runs_them(name):
    m = rm.MODELS[name]
    assert m.path() is not None, f"{m.requirement} is not installed: run tools/setup.sh"
    sess = _session(m)
    feeds = m.inputs(0)
    assert sorted(feeds) == sorted(i.name for i in sess.get_inputs())
    for i in sess.get_inputs():
        a = feeds[i.name]
        assert a.dtype == _TYPES[i.type], (i.name, a.dtype, i.type)
        assert len(a.shape) == len(i.shape)
        for have, declared in zip(a.shape, i.shape):
            assert not isinstance(declared, int) or have == declared, (i.name, a.shape, i.shape)
        if i.name in m.shapes:
            assert a.shape == tuple(m.shapes[i.name])
    outs = sess.run(None, feeds)
    assert all(np.isfinite(o).all() for o in outs if o.dtype.kind == "f")
    assert not np.array_equal(m.inputs(0)[sess.get_inputs()[0].name], m.inputs(1)[sess.get_inputs()[0].name])


def test_calibration_concatenates_samples_on_axis_0():
    m = rm.MODELS["ppocrv4-rec"]
    calib = m.calibration(3)
    assert calib["x"].shape == (3, 3, 48, 320)
    np.testing.assert_array_equal(calib["x"][1:2], m.inputs(1)["x"])


def test_missing_package_gives_none():
    assert rm.model_file("no-such-distribution-here", "x.onnx") is None
    assert rm.model_file("numpy", "numpy/no_such_model.onnx") is None


def test_recognizer_reads_the_rendered_text():
    m = rm.MODELS["ppocrv4-rec"]
    chars = {p.key: p.value for p in onnx.load(str(m.path())).metadata_props}["character"].splitlines() + [" "]
    probs = _session(m).run(None, m.inputs(0))[0][0]
    ids = probs.argmax(-1)
    text = "".join(chars[i - 1] for k, i in enumerate(ids) if i and (k == 0 or ids[k - 1] != i))
    assert len(text.strip()) >= 8 and probs.max(-1)[ids > 0].mean() > 0.8, text


def test_magika_recognizes_real_files():
    m = rm.MODELS["magika-v3.3"]
    labels = json.loads((m.path().parent / "config.min.json").read_text())["target_labels_space"]
    files = rm._real_files()
    sess = _session(m)
    expected = {".py": "python", ".so": "elf"}
    checked = 0
    for seed in range(20):                 # the seed picks the file (as real_models._magika does)
        path = files[int(np.random.default_rng(seed).integers(len(files)))]
        if path.suffix in expected:
            assert labels[int(sess.run(None, m.inputs(seed))[0].argmax())] == expected[path.suffix], path
            checked += 1
    assert checked >= 4


def test_vad_hears_speech_not_silence():
    m = rm.MODELS["silero-vad-sequence"]
    sess = _session(m)
    speech = sess.run(None, m.inputs(0))[0]
    quiet = dict(m.inputs(0), input=np.random.default_rng(0).normal(0, 0.003, (32, 576)).astype(np.float32))
    assert speech.mean() > 0.5 > sess.run(None, quiet)[0].mean()
