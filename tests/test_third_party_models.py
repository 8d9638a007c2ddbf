"""Real third-party models with dynamic shapes: PaddleOCR's PP-OCRv4 text detector (DBNet, MobileNetV3 backbone,
FPN with Resize and ConvTranspose), its recognizer (SVTR-LCNet: convs, attention, LayerNorm written as ReduceMean/
Pow/Sqrt, shapes computed with Shape/Slice/Concat) and the mobile direction classifier, exported by Paddle2ONNX
(weights in Constant nodes, opsets 11-12, symbolic batch/height/width). They ship inside the rapidocr-onnxruntime
wheel that tools/setup.sh installs (no downloads at run time).

Each is loaded with its dynamic dimensions bound, compiled for cpu and compared with onnxruntime (api.compile
raises when the library differs), pruned with the oracle, and built for the other targets."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from graphopt import api, ort
from graphopt.errors import BadInput
from graphopt.hardware import GENERIC as HW16
from graphopt.passmanager import PassContext, PassManager
from graphopt.targets import arm_sve, cuda

SHAPES = {  # the shapes RapidOCR feeds them (height 48 for text lines, multiples of 32 for the detector)
    "ch_PP-OCRv4_det_infer.onnx": (1, 3, 192, 256),
    "ch_PP-OCRv4_rec_infer.onnx": (1, 3, 48, 320),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (1, 3, 48, 192),
}


def model_path(name: str) -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")     # find only: importing it needs OpenCV
    assert spec is not None, "rapidocr-onnxruntime is not installed: run tools/setup.sh (it carries the models)"
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    assert path.is_file(), path
    return path


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_compiles_for_cpu_and_matches_onnxruntime(name, tmp_path):
    art = api.compile(model_path(name), "cpu", tmp_path / "out", pipeline="cleanup",
                      input_shapes={"x": SHAPES[name]}, measure=False)
    assert art.report["check"]["ok"] is True
    assert art.report["macs_after"] == art.report["macs_before"] > 0
    # run again through the artifact on another input: same answer as onnxruntime on the original file
    feeds = ort.random_inputs([("x", SHAPES[name], np.float32)], seed=3)
    ref = ort.run(model_path(name).read_bytes(), feeds)
    got = art.run(feeds)
    for (k, r), g in zip(ref.items(), got.values()):
        assert g.shape == r.shape
        assert np.abs(g - r).max() <= 1e-4 * max(1.0, float(np.abs(r).max())), k


def test_dynamic_dimensions_must_be_bound(tmp_path):
    with pytest.raises(BadInput, match=r"input 'x' has dynamic shape .*--input-shape x="):
        api.compile(model_path("ch_PP-OCRv4_rec_infer.onnx"), "cpu", tmp_path / "out", measure=False)
    assert not (tmp_path / "out").exists()


def _prune(name, text="cleanup,prune-channels{flops=0.5}"):
    from graphopt.loading import load
    graph = load(model_path(name), input_shapes={"x": SHAPES[name]})
    res = PassManager.parse(text).run(graph, PassContext(target="cpu", hw=HW16))
    return [r for r in res.records if r["pass"].startswith("prune-channels")][0]


@pytest.mark.parametrize("name", ["ch_PP-OCRv4_det_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"])
def test_prune_half_the_macs_oracle_holds(name):
    rec = _prune(name)
    assert rec["info"]["budget_met"] and rec["info"]["macs"]["ratio"] <= 0.5
    # the pass raises when the oracle fails (atol 1e-5 scaled by the output's magnitude: the detector's logits
    # under its sigmoid reach ~20, where 1.9e-5 is float32 rounding)
    assert "oracle_max_error" in rec["info"] and rec["info"]["oracle_max_error"] <= 1e-4


def test_prune_recognizer_oracle_in_float64():
    """Pruned at half the MACs the recognizer amplifies float32 rounding (zeroed and pruned graphs differ by ~2e-4
    in its 6625-way softmax, and so do onnxruntime's own float32 results and float64 ones); the oracle then
    decides in float64, where a correct removal agrees to ~1e-12."""
    rec = _prune("ch_PP-OCRv4_rec_infer.onnx")
    assert rec["info"]["budget_met"] and rec["info"]["macs"]["ratio"] <= 0.6
    if "oracle_fp64_max_error" in rec["info"]:
        assert rec["info"]["oracle_fp64_max_error"] <= 1e-9
        assert "float32" in rec["info"]["oracle_note"]


def test_pruned_recognizer_compiles_and_matches(tmp_path):
    """The pruned recognizer amplifies float32 rounding enough that graphopt and onnxruntime can differ by more
    than the fp32 tolerance; the check then compares both with float64, its softmax output in logit space, and
    accepts graphopt when it is no further off than twice onnxruntime (report.json says so). Channels-last (the
    default) sums in another order than NCHW: read as probabilities its float64 error was 2.8x onnxruntime's on
    the check's inputs, a near-tie's luck; as logits 1.5x."""
    name = "ch_PP-OCRv4_rec_infer.onnx"
    art = api.compile(model_path(name), "cpu", tmp_path / "out", pipeline="cleanup,prune-channels{flops=0.5}",
                      input_shapes={"x": SHAPES[name]}, measure=False)
    check = art.report["check"]
    assert check["ok"] is True and art.manifest["target"]["layout"] == "nhwc"
    if "note" in check:
        assert check["fp64_error_graphopt"] <= 2 * check["fp64_error_onnxruntime"]
        assert "logit space" in check["note"]


@pytest.mark.skipif(arm_sve.ArmSveTarget().setup_problem() is not None, reason="run tools/setup_arm.sh")
def test_classifier_on_arm_sve_under_qemu(tmp_path):
    name = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    art = api.compile(model_path(name), "arm-sve", tmp_path / "out", input_shapes={"x": SHAPES[name]},
                      measure=False)
    assert art.report["check"]["ok"] is True          # run under qemu-aarch64 (SVE) against onnxruntime on x86


@pytest.mark.skipif(cuda.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")
def test_classifier_builds_for_cuda(tmp_path):
    name = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    art = api.compile(model_path(name), "cuda", tmp_path / "out", input_shapes={"x": SHAPES[name]},
                      measure=False)
    assert art.report["device_code"] == {"sass": ["sm_80", "sm_90"], "ptx": ["compute_90"]}
    if not cuda.gpu_available():
        assert art.report["check"]["ok"] is None         # built ahead of time; no GPU here to run it
    else:
        assert art.report["check"]["ok"] is True


def test_classifier_dead_channels_all_go_whatever_the_rounding():
    """16 provably dead channels in the direction classifier (zero weights and bias of 4 expansion channels and of
    their depthwise convs, in blocks 88, 88, 40 and 48 wide, before hardswish): none of those widths minus 4 is a
    multiple of 16, so rounding to 16 removed nothing; exact removal takes all 16 and stays exact."""
    from graphopt.loading import load
    name = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    graph = PassManager.parse("cleanup").run(load(model_path(name), input_shapes={"x": SHAPES[name]})).graph
    nodes = {n.name: n for n in graph.nodes}
    for expand, depthwise in (("Conv@17", "Conv@18"), ("Conv@22", "Conv@23"), ("Conv@27", "Conv@28"),
                              ("Conv@32", "Conv@33")):
        for n in (nodes[expand], nodes[depthwise]):
            for i in (1, 2):
                v = n.inputs[i].values.copy()
                v[[1, 5, 6, 9]] = 0
                n.inputs[i].values = v
    res = PassManager.parse("prune-channels{criterion=dead}").run(graph, PassContext(target="cpu",
                                                                                     hw=HW16))
    rec = res.records[-1]
    assert rec["info"]["round_to"] == 16 and rec["info"]["units"]["removed"] == 16 and rec["info"]["held"] == []
    assert rec["exact"] and rec["max_error"] <= 1e-5
    assert {k: v for k, v in rec["info"]["layers"].items() if v[0] != v[1]}["Conv@17"] == [88, 84]
