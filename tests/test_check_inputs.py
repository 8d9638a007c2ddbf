"""Compile's self-check feeds inputs the model can take: index inputs bounded by the table they index, attention
masks as 0/1 with a 1 in every row, or the user's own (--check-inputs / eval / calibration data); NaN is never a
silent match and report.json stays strict JSON."""
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt.check_inputs import input_ranges
from graphopt.cli import main

pytestmark = pytest.mark.fast

SEQ, VOCAB = 8, 30


class TinyBert(nn.Module):
    """Word + token-type embeddings (2 rows), one attention layer with the additive mask of BERT exports:
    (1 - mask) * float32 min, which overflows to +inf for mask values other than 0 and 1."""

    def __init__(self):
        super().__init__()
        self.word, self.token_type = nn.Embedding(VOCAB, 16), nn.Embedding(2, 16)
        self.q, self.k, self.v, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, input_ids, token_type_ids, attention_mask):
        h = self.word(input_ids) + self.token_type(token_type_ids)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / 4.0
        scores = scores + (1.0 - attention_mask[:, None, :].float()) * torch.finfo(torch.float32).min
        return self.out(torch.softmax(scores, -1) @ self.v(h))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    torch.manual_seed(0)
    ids = torch.zeros((1, SEQ), dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyBert().eval(), (ids, ids, ids), str(path), opset_version=17, dynamo=False,
                          input_names=["input_ids", "token_type_ids", "attention_mask"], output_names=["logits"])
    return path


def _strict(path):
    def no_constant(c):
        raise AssertionError(f"bare {c} in {path}")
    return json.loads(path.read_text(), parse_constant=no_constant)


def test_ranges_are_read_off_the_graph(bert):
    r = input_ranges(graphopt.load(bert))
    assert r == {"input_ids": {"kind": "index", "high": VOCAB}, "token_type_ids": {"kind": "index", "high": 2},
                 "attention_mask": {"kind": "mask"}}


def test_compile_checks_a_bert_on_inputs_it_takes(bert, tmp_path, capsys):
    """Random integers in [0, 4) would index row 3 of a 2-row table and make the masked softmax NaN everywhere."""
    assert main(["compile", str(bert), "-o", str(tmp_path / "a"), "--no-bench"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    check = _strict(tmp_path / "a" / "report.json")["check"]
    assert check["ok"] and "nonfinite" not in check and check["max_abs_error"] < 1e-3
    assert "token_type_ids in [0, 2)" in check["inputs"] and "attention_mask 0/1 mask" in check["inputs"]
    assert "checked on" in out and "(ok)" in out and "weight bytes" in out


def test_check_inputs_file_and_nan_is_never_a_silent_match(bert, tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = {"input_ids": rng.integers(0, VOCAB, (3, SEQ)), "token_type_ids": rng.integers(0, 2, (3, SEQ)),
            "attention_mask": np.ones((3, SEQ), np.int64)}
    np.savez(tmp_path / "good.npz", **good)
    assert main(["compile", str(bert), "-o", str(tmp_path / "a"), "--no-bench",
                 "--check-inputs", str(tmp_path / "good.npz")]) == 0
    assert _strict(tmp_path / "a" / "report.json")["check"]["inputs"] == "first sample of the --check-inputs"
    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", **dict(good, attention_mask=np.full((3, SEQ), 3)))   # every score +inf: NaN
    assert main(["compile", str(bert), "-o", str(tmp_path / "b"), "--no-bench",
                 "--check-inputs", str(tmp_path / "bad.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert "NaN or infinite in both engines" in err and "--check-inputs" in err and "\n" not in err
    np.savez(tmp_path / "shape.npz", **dict(good, attention_mask=np.ones((3, SEQ + 1), np.int64)))
    assert main(["compile", str(bert), "-o", str(tmp_path / "c"), "--no-bench",
                 "--check-inputs", str(tmp_path / "shape.npz")]) == 2
    err = capsys.readouterr().err
    assert "'attention_mask' has shape [3, 9]" in err and "[1, 8]" in err


def test_nan_agreement_is_reported_not_hidden(tmp_path):
    """Some outputs NaN in both engines at the same places (log of negative inputs): accepted, and the report
    says so; the error figure stays a number."""
    from onnx import TensorProto, helper
    vi = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Log", ["x"], ["l"]), helper.make_node("Mul", ["l", "l"], ["y"])], "log",
        [vi("x", TensorProto.FLOAT, [1, 16])], [vi("y", TensorProto.FLOAT, [1, 16])]),
        opset_imports=[helper.make_opsetid("", 17)])
    x = np.linspace(-1, 2, 16, dtype=np.float32)[None]
    art = graphopt.compile(model, out=tmp_path / "a", measure=False, check_inputs={"x": x})
    check = _strict(tmp_path / "a" / "report.json")["check"]
    assert check["ok"] and check["nonfinite"] == {"y": {"nonfinite": 6, "elements": 16}}
    assert "same elements of 'y' (6 of 16)" in check["note"] and check["max_abs_error"] is not None
    assert art.report["check"]["ok"]


def test_strict_json_writer(tmp_path):
    from graphopt.artifact import write_json
    write_json(tmp_path / "r.json", {"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.float64(2.0)})
    assert _strict(tmp_path / "r.json") == {"a": None, "b": [None, 1.5], "c": 2.0}


def test_a_table_of_unknown_shape_is_traced_to_its_constant():
    """(all-MiniLM-L6 stored int8: the token-type table is Cast(int8 constant) * scale, and a quantized graph reads
    its tables through DequantizeLinear) the index bound comes from the constant when inference left no shape."""
    import onnx_graphsurgeon as gs
    table = gs.Constant("table_i8", np.ones((2, 4), np.int8))
    cast = gs.Variable("table_f", np.float32)                            # shape unknown
    scaled = gs.Variable("table", np.float32)
    ids = gs.Variable("token_type_ids", np.int64, (1, 3))
    out = gs.Variable("emb", np.float32, (1, 3, 4))
    nodes = [gs.Node("Cast", inputs=[table], outputs=[cast], attrs={"to": 1}),
             gs.Node("Mul", inputs=[cast, gs.Constant("s", np.array(0.5, np.float32))], outputs=[scaled]),
             gs.Node("Gather", inputs=[scaled, ids], outputs=[out])]
    g = gs.Graph(nodes=nodes, inputs=[ids], outputs=[out])
    assert input_ranges(g) == {"token_type_ids": {"kind": "index", "high": 2}}
