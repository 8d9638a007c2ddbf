import pytest

from graphopt import PassManager
from graphopt.errors import BadInput
from graphopt.pipeline_text import parse


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
