import math
import os

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from graphopt import PassManager
from graphopt.errors import BadInput
from graphopt.passmanager import REGISTRY, get_pass_class, load_passes
from graphopt.pipeline_text import parse

pytestmark = pytest.mark.fast

load_passes()


def test_parse_options_and_types():
    steps = parse("a,b{x=1,y=0.5,z=true,w=l1,v=[n1,n2]},c{}")
    assert steps == [("a", {}), ("b", {"x": 1, "y": 0.5, "z": True, "w": "l1", "v": ["n1", "n2"]}), ("c", {})]


@pytest.mark.parametrize("text", ["cleanup", "fold-constants{max_rounds=2},remove-identity,cleanup{max_iterations=3}",
                                  "fold-batchnorm,eliminate-dead-code,infer-shapes"])
def test_round_trip_text_and_toml(text):
    pm = PassManager.parse(text)
    assert str(pm) == text
    assert PassManager.parse(str(pm)) == pm
    assert PassManager.from_toml(pm.to_toml()) == pm
    assert PassManager.parse(pm.resolved()) == pm


@pytest.mark.parametrize("text,needle", [
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("fold-constnts", "did you mean 'fold-constants'"),
    ("cleanup{bogus=1}", "has no option 'bogus'"),
    ("cleanup{max_iterations=x}", "must be an integer"),
    ("cleanup{max_iterations=0}", "at least 1"),
    ("cleanup{max_iterations}", "needs a value"),
    ("cleanup{max_iterations=1", "unbalanced"),
    ("cleanup,,fold-constants", "empty pass name"),
])
def test_bad_pipelines_fail_at_parse_time(text, needle):
    with pytest.raises(BadInput, match=needle.replace("(", r"\(").replace("{", r"\{")):
        PassManager.parse(text)


def test_toml_errors():
    with pytest.raises(BadInput, match="invalid TOML"):
        PassManager.from_toml("[[pass]\nname=1\n")
    with pytest.raises(BadInput, match="needs a string 'name'"):
        PassManager.from_toml("[[pass]]\nmax_rounds = 1\n")


# ---------------------------------------------------------------------------------------------------------------
# print/parse round trip: the manifest's pipeline text (given and resolved) and its TOML parse back to the same passes

@pytest.mark.parametrize("text", ["prune-channels{criterion=dead}", "quantize{scheme=weight_int8}",
                                  "sparsify{block=1:4}", 'sparsify{ignore=["007","a,b",""]}',
                                  "factorize-lowrank{rank=4}"])
def test_resolved_text_reparses(text):
    pm = PassManager.parse(text)
    assert PassManager.parse(pm.resolved()) == pm
    assert PassManager.from_toml(pm.to_toml(resolved=True)) == pm


def test_strings_are_quoted_where_they_would_not_reparse():
    pm = PassManager.parse('sparsify{ignore=["007","a,b",true,"x\\"y\\\\z",\'lit\\n\',it\'s]}')
    assert pm.passes[0].opts["ignore"] == ["007", "a,b", "true", 'x"y\\z', "lit\\n", "it's"]
    assert str(pm) == 'sparsify{ignore=["007","a,b","true","x\\"y\\\\z","lit\\\\n","it\'s"]}'
    assert PassManager.parse(str(pm)) == pm and PassManager.from_toml(pm.to_toml()) == pm
    with pytest.raises(BadInput, match="unterminated"):
        PassManager.parse('sparsify{ignore=["a]}')


_WORDS = ["", "007", "true", "a,b", "x{y}", "[z]", 'q"q', "back\\slash", "sp ace", "new\nline", "it's", "1e5",
          "nan", "4x4", "1x16", "2:4", "1:4", "full", "0.5", "3", "gemm", "conv", "matmul", "a:b", "é", "\x7f"]
_STR = st.one_of(st.sampled_from(_WORDS), st.text(max_size=8))


def _strategy(opt):
    if opt.choices is not None:
        return st.sampled_from(opt.choices)
    if opt.type is bool:
        return st.booleans()
    lo = opt.minimum if opt.minimum is not None else -10**6
    hi = opt.maximum if opt.maximum is not None else 10**6
    if opt.type is int:
        lo, hi = int(math.ceil(lo)), int(math.floor(hi))
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi] + [v for v in (0, 1, 2, 16, 32, 64)
                                                                          if lo <= v <= hi]))
    if opt.type is float:              # most fractions live in [0, 1]
        unit = [st.floats(max(lo, 0.0), min(hi, 1.0))] if max(lo, 0.0) <= min(hi, 1.0) else []
        return st.one_of(st.floats(lo, hi, allow_nan=False), *unit,
                         st.sampled_from([lo, hi] + [v for v in (0.0, 0.5, 1.0) if lo <= v <= hi]))
    if opt.type is str:
        return _STR
    return st.lists(_STR, max_size=3)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_print_parse_round_trip_for_every_pass(name):
    cls = get_pass_class(name)
    options = st.fixed_dictionaries({}, optional={k: _strategy(o) for k, o in cls.options.items()})

    @settings(max_examples=int(os.environ.get("GRAPHOPT_FUZZ_EXAMPLES", 150)), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(options)
    def check(opts):
        try:
            p = cls(**opts)
        except BadInput:
            reject()
        pm = PassManager([p])
        for text in (str(pm), pm.resolved()):
            back = PassManager.parse(text)
            assert back == pm, text
        assert PassManager.parse(str(pm)).passes[0].given == p.given
        for toml in (pm.to_toml(), pm.to_toml(resolved=True)):
            assert PassManager.from_toml(toml) == pm, toml
        assert PassManager.from_toml(pm.to_toml()).passes[0].given == p.given
    check()
