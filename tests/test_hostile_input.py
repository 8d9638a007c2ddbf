"""Hostile and careless input through the real CLI: exit 2 and one `graphopt: error:` line, before anything big is
allocated; messages stay one line whatever the user's names hold; library chatter stays off stderr; --debug
works after the subcommand too."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from numpy.lib import format as npy_format
from onnx import TensorProto, helper

import onnx_builders as ob
from graphopt.cli import main

pytestmark = pytest.mark.fast

GRAPHOPT = [sys.executable, "-m", "graphopt.cli"]
TB = 10 ** 12


def _matmul():
    return ob.model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [ob.vi("x", [1, 4])],
                    [ob.vi("y", [1, 4])], [("w", ob.rnd(4, 4))])


def _relu(shape, dtype=TensorProto.FLOAT, out_dtype=None):
    return ob.model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [ob.vi("x", shape, dtype)],
                    [ob.vi("y", shape, out_dtype or dtype)])


def _external(folder, key, value):
    """A MatMul whose weight is external data, with one external_data entry set to value."""
    folder.mkdir()
    m = _matmul()
    onnx.external_data_helper.convert_model_to_external_data(m, location="w.bin", size_threshold=0)
    onnx.save_model(m, str(folder / "m.onnx"))
    m = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    entries = m.graph.initializer[0].external_data
    if not any(e.key == key for e in entries):
        entries.add(key=key)
    next(e for e in entries if e.key == key).value = value
    (folder / "m.onnx").write_bytes(m.SerializeToString())
    return folder / "m.onnx"


def _npz_declaring(path, arrays):
    """An .npz whose members declare the given shapes (float32) but hold only 1 kB of data each."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, shape in arrays:
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
                f.write(bytes(1024))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    f = {"dir": d, "tiny": ob.save(_matmul(), d / "tiny.onnx"),
         "dyn": ob.save(_relu(["N", 4]), d / "dyn.onnx"),
         "huge_input": ob.save(_relu([100000, 100000, 1000]), d / "huge_input.onnx"),
         "expand_40g": ob.save(ob.model([helper.make_node("Expand", ["x", "s"], ["y"], name="expand")],
                                        [ob.vi("x", [1, 4])], [ob.vi("y", None)],
                                        [("s", np.array([2_500_000_000, 4], np.int64))]), d / "expand.onnx"),
         "bf16_in": ob.save(_relu([1, 4], TensorProto.BFLOAT16), d / "bf16_in.onnx"),
         "bf16_out": ob.save(ob.model([helper.make_node("Cast", ["x"], ["y"], name="cast", to=TensorProto.BFLOAT16)],
                                      [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4], TensorProto.BFLOAT16)]),
                             d / "bf16_out.onnx"),
         "bf16_inside": ob.save(ob.model([helper.make_node("Cast", ["x"], ["a"], name="to_bf16", to=TensorProto.BFLOAT16),
                                          helper.make_node("Relu", ["a"], ["b"], name="relu_bf16"),
                                          helper.make_node("Cast", ["b"], ["y"], name="to_f32", to=TensorProto.FLOAT)],
                                         [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])]), d / "bf16_inside.onnx"),
         "cycle": ob.save(ob.model([helper.make_node("Add", ["x", "b"], ["a"], name="add_in_cycle"),
                                    helper.make_node("Relu", ["a"], ["b"], name="relu_in_cycle"),
                                    helper.make_node("Identity", ["a"], ["y"], name="out")],
                                   [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])]), d / "cycle.onnx"),
         "missing_init": ob.save(ob.model([helper.make_node("MatMul", ["x", "w_gone"], ["y"], name="mm_missing")],
                                          [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])]), d / "missing.onnx"),
         "ext_nul": _external(d / "ext_nul", "location", "w\0.bin"),
         "ext_negative": _external(d / "ext_negative", "offset", "-64"),
         "ext_text": _external(d / "ext_text", "offset", "abc"),
         "in": d / "in.npz", "a_file": d / "a_file"}
    for op in ("ConstantOfShape", "Expand", "Tile"):
        f[f"grow_{op}"] = ob.save(ob.growing_constant(op, 1 << 20), d / f"grow_{op}.onnx")     # 4 MB once folded
    f["a_file"].write_text("not a folder")
    np.savez(f["in"], x=np.zeros((1, 4), np.float32))
    np.savez_compressed(d / "bomb.npz", x=np.zeros((1, 4), np.float32), junk=np.zeros(1 << 24, np.float32))
    np.save(d / "obj.npy", np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(d / "object.npz", "w") as z:
        z.write(d / "obj.npy", "x.npy")
    _npz_declaring(d / "declares_12g.npz", [("x", (3_000_000_000, 1))])
    _npz_declaring(d / "declares_12g_extra.npz", [("x", (1, 4)), ("junk", (3_000_000_000,))])
    with open(d / "huge.onnx", "wb") as fh:          # sparse: no disk is written
        fh.truncate((1 << 31) + 4096)
    (d / "empty_db").mkdir()
    (d / "garbage_db").mkdir()
    (d / "garbage_db" / "database_workload.json").write_text("garbage\n")
    (d / "garbage_db" / "database_tuning_record.json").write_text('{"x":\n')
    (d / "foreign_db").mkdir()                        # JSON of the right form, content TVM cannot decode
    (d / "foreign_db" / "database_workload.json").write_text('["123", "bm90IGEgbW9kdWxl"]\n')
    (d / "foreign_db" / "database_tuning_record.json").write_text("[0, [1, 2]]\n")
    assert main(["compile", str(f["tiny"]), "-o", str(d / "art"), "--no-bench"]) == 0
    f["art"] = d / "art"
    return f


def _argv(template, files):
    return [str(a).format(**{k: str(v) for k, v in files.items()}) for a in template]


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def _expect_exit_2(capsys, monkeypatch, files, argv, env, needles):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(_argv(argv, files))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


# Each case: (argv, environment, needles of the one error line).
MEMORY_AND_TIME = {
    "npz_over_the_input_limit": (["run", "{art}", "--inputs", "{dir}/bomb.npz"], {"GRAPHOPT_MAX_INPUT_BYTES": "16M"},
                                 ["bomb.npz", "'junk'", "67.1 MB", "GRAPHOPT_MAX_INPUT_BYTES"]),
    "npz_declares_12g_right_name": (["run", "{art}", "--inputs", "{dir}/declares_12g.npz"], {},
                                    ["'x' declares [3000000000, 1] float32", "truncated"]),
    "npz_declares_12g_extra": (["run", "{art}", "--inputs", "{dir}/declares_12g_extra.npz"], {},
                               ["'junk' declares [3000000000] float32"]),
    "npz_object_array": (["run", "{art}", "--inputs", "{dir}/object.npz"], {}, ["'x' has dtype object"]),
    "model_over_2gb": (["compile", "{dir}/huge.onnx", "-o", "{dir}/out"], {}, ["huge.onnx", "2.1 GB", "external data"]),
    "input_shape_overflows_int64": (["compile", "{dyn}", "-o", "{dir}/out", "--input-shape", "x=99999999999999999999,4"],
                                    {}, ["more elements than a 64-bit integer"]),
    "input_shape_product_overflows": (["compile", "{dyn}", "-o", "{dir}/out", "--input-shape",
                                       "x=9223372036854775807,4"], {}, ["more elements than a 64-bit integer"]),
    "input_shape_terabytes": (["compile", "{dyn}", "-o", "{dir}/out", "--input-shape", "x=1000000000000,4"], {},
                              ["input 'x' would be [1000000000000, 4] float32 (16.0 TB)", "GRAPHOPT_MAX_TENSOR_BYTES"]),
    "static_dim_terabytes": (["inspect", "{huge_input}"], {}, ["input 'x' would be [100000, 100000, 1000] float32"]),
    "expand_to_40gb": (["compile", "{expand_40g}", "-o", "{dir}/out"], {"GRAPHOPT_MAX_TENSOR_BYTES": "8G"},
                       ["node 'expand' (Expand)", "40.0 GB", "8.6 GB"]),
    "constant_of_shape_over_limit": (["inspect", "{grow_ConstantOfShape}"], {"GRAPHOPT_MAX_TENSOR_BYTES": "1M"},
                                     ["node 'grow' (ConstantOfShape)", "4.2 MB"]),
    "tile_over_limit": (["inspect", "{grow_Tile}"], {"GRAPHOPT_MAX_TENSOR_BYTES": "1M"}, ["node 'grow' (Tile)"]),
    "bad_limit_setting": (["inspect", "{tiny}"], {"GRAPHOPT_MAX_TENSOR_BYTES": "lots"}, ["GRAPHOPT_MAX_TENSOR_BYTES=lots"]),
    "threads_above_cores": (["compile", "{tiny}", "-o", "{dir}/out", "--no-bench", "--threads", "100000"], {},
                            ["--threads 100000 is more than the"]),
    "run_threads_above_cores": (["run", "{art}", "--inputs", "{in}", "--threads", "100000"], {},
                                ["--threads 100000"]),
}


@pytest.mark.parametrize("case", list(MEMORY_AND_TIME))
def test_memory_and_time_are_bounded(case, files, capsys, monkeypatch):
    argv, env, needles = MEMORY_AND_TIME[case]
    _expect_exit_2(capsys, monkeypatch, files, argv, env, needles)
    assert not (files["dir"] / "out").exists()


BAD_INPUT = {
    "bfloat16_input": (["compile", "{bf16_in}", "-o", "{dir}/out"], ["input 'x' is BFLOAT16"]),
    "bfloat16_output": (["compile", "{bf16_out}", "-o", "{dir}/out"], ["output 'y' is BFLOAT16"]),
    "bfloat16_inside": (["compile", "{bf16_inside}", "-o", "{dir}/out"], ["onnxruntime", "relu_bf16"]),
    "external_data_nul": (["compile", "{ext_nul}", "-o", "{dir}/out"], ["invalid external data location 'w\\x00.bin'"]),
    "external_data_negative_offset": (["compile", "{ext_negative}", "-o", "{dir}/out"], ["offset '-64'"]),
    "external_data_text_offset": (["compile", "{ext_text}", "-o", "{dir}/out"], ["offset 'abc'"]),
    "run_outputs_is_a_folder": (["run", "{art}", "--inputs", "{in}", "--outputs", "{dir}"], ["is a folder"]),
    "run_outputs_parent_missing": (["run", "{art}", "--inputs", "{in}", "--outputs", "{dir}/no/o.npz"],
                                   ["no such folder"]),
    "bench_repeat_0": (["bench", "{art}", "--repeat", "0"], ["--repeat", "at least 1"]),
    "sparsify_huge_block": (["compile", "{tiny}", "-o", "{dir}/out", "--pipeline", "sparsify{{block=100000x100000}}"],
                            ["block=100000x100000 has a side above 256"]),
    "cores_not_a_number": (["compile", "{tiny}", "-o", "{dir}/out", "--target-option", "cores=abc"],
                           ["cores must be a whole number", "'abc'"]),
    "cores_fraction": (["compile", "{tiny}", "-o", "{dir}/out", "--target-option", "cores=2.5"],
                       ["cores must be a whole number", "2.5"]),
    "tuning_db_empty": (["compile", "{tiny}", "-o", "{dir}/out", "--tuning-db", "{dir}/empty_db"],
                        ["empty_db: not a tuning database (database_workload.json is missing)"]),
    "tuning_db_garbage": (["compile", "{tiny}", "-o", "{dir}/out", "--tuning-db", "{dir}/garbage_db"],
                          ["database_workload.json: line 1 is not JSON"]),
    "tuning_db_foreign": (["compile", "{tiny}", "-o", "{dir}/out", "--tuning-db", "{dir}/foreign_db", "--no-bench"],
                          ["TVM cannot read this tuning database"]),
    "tune_into_garbage_db": (["tune", "{tiny}", "--db", "{dir}/garbage_db", "--trials", "1"], ["line 1 is not JSON"]),
    "output_parent_is_a_file": (["compile", "{tiny}", "-o", "{a_file}/out"], ["a_file: is not a folder"]),
    "cycle": (["compile", "{cycle}", "-o", "{dir}/out"],
              ["node 'add_in_cycle' (Add) reads 'b'", "'relu_in_cycle' (Relu)", "cycle"]),
    "missing_initializer": (["compile", "{missing_init}", "-o", "{dir}/out"],
                            ["node 'mm_missing' (MatMul) reads 'w_gone'", "missing initializer"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case, files, capsys, monkeypatch):
    argv, needles = BAD_INPUT[case]
    _expect_exit_2(capsys, monkeypatch, files, argv, {}, needles)
    assert not (files["dir"] / "out").exists()
    assert not [p for p in files["dir"].iterdir() if ".tmp" in p.name], "a temporary was left behind"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_output_in_a_read_only_folder(files, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _expect_exit_2(capsys, monkeypatch, files, ["compile", "{tiny}", "-o", str(ro / "out")], {}, ["not writable"])
    finally:
        ro.chmod(0o755)


BUILD_KEYS = {
    "evaluate_repeat_negative": ('[evaluate]\nrepeat = -5\n', ["[evaluate] repeat must be at least 1, got -5"]),
    "evaluate_noise_std_text": ('[evaluate]\nnoise_std = "abc"\n', ["[evaluate] noise_std must be a number, got 'abc'"]),
    "evaluate_threads_text": ('[evaluate]\nthreads = "x"\n', ["[evaluate] threads must be an integer, got 'x'"]),
    "evaluate_threads_above_cores": ('[evaluate]\nthreads = 100000\n',
                                     ["b.toml: [evaluate] threads 100000 is more than"]),
    "evaluate_robustness_text": ('[evaluate]\nrobustness = "yes"\n', ["[evaluate] robustness must be true or false"]),
    "compress_epochs_text": ('[compress]\nepochs = "ten"\n', ["[compress] epochs must be an integer, got 'ten'"]),
    "compress_lr_zero": ('[compress]\nlr = 0\n', ["[compress] lr must be above 0.0"]),
}


@pytest.mark.parametrize("case", list(BUILD_KEYS))
def test_build_keys_are_type_checked_before_anything_runs(case, files, tmp_path, capsys, monkeypatch):
    toml, needles = BUILD_KEYS[case]
    (tmp_path / "b.toml").write_text(f'[model]\npath = "{files["tiny"]}"\n\n' + toml)
    _expect_exit_2(capsys, monkeypatch, files, ["build", str(tmp_path / "b.toml")], {}, needles)
    assert not (tmp_path / "build").exists()


def test_messages_stay_one_line_whatever_the_names_hold(files, tmp_path, capsys, monkeypatch):
    evil = ob.model([helper.make_node("Add", ["x", "w_gone"], ["y"], name="evil\ngraphopt: error: forged\x1b[31m")],
                    [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])])
    out = str(tmp_path / "out")
    line = _expect_exit_2(capsys, monkeypatch, files, ["compile", str(ob.save(evil, tmp_path / "evil.onnx")), "-o", out],
                          {}, ["node 'evil\\ngraphopt: error: forged\\x1b[31m' (Add)"])
    assert "\x1b" not in line
    _expect_exit_2(capsys, monkeypatch, files, ["compile", "{tiny}", "-o", out, "--pipeline",
                                                "cleanup\ngraphopt: error: forged"],
                   {}, ["'cleanup\\ngraphopt: error: forged'"])
    _expect_exit_2(capsys, monkeypatch, files, ["compile", str(tmp_path / "no\nsuch.onnx"), "-o", out], {},
                   ["no\\nsuch.onnx"])
    _expect_exit_2(capsys, monkeypatch, files, ["inspect", "{tiny}", "--input-shape", "x\n=1,4"], {}, ["'x\\n'"])


def test_debug_works_after_the_subcommand(files, capsys):
    with pytest.raises(Exception) as e:
        main(["compile", str(files["dir"] / "nope.onnx"), "--debug"])
    assert "nope.onnx: no such file" in str(e.value)
    with pytest.raises(Exception):
        main(["--debug", "inspect", str(files["dir"] / "nope.onnx")])
    assert main(["inspect", str(files["dir"] / "nope.onnx")]) == 2


def test_library_chatter_stays_off_stderr_unless_debug(tmp_path):
    """A constant Gather out of range: onnxruntime logs a coloured warning and an error while onnx-graphsurgeon
    tries to fold it; graphopt's user sees neither (and still gets the model inspected), --debug shows them."""
    m = ob.model([helper.make_node("Gather", ["w", "i"], ["g"], name="gather", axis=0),
                  helper.make_node("Add", ["x", "g"], ["y"], name="add")], [ob.vi("x", [1, 4])], [ob.vi("y", [1, 4])],
                 [("w", np.ones((2, 4), np.float32)), ("i", np.array([7], np.int64))])
    path = ob.save(m, tmp_path / "gather.onnx")
    quiet = subprocess.run(GRAPHOPT + ["inspect", str(path)], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run(GRAPHOPT + ["inspect", str(path), "--debug"], capture_output=True, text=True)
    assert loud.returncode == 0 and "onnxruntime" in loud.stderr
