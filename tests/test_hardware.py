"""graphopt.hardware: what each target declares about its hardware, and what passes take from it."""
import json

import pytest

from graphopt import cli
from graphopt.hardware import GENERIC, HardwareInfo, Structure
from graphopt.passmanager import PassContext, get_pass_class
from graphopt.targets import get_target

pytestmark = pytest.mark.fast


def test_each_target_states_the_structure_that_pays_there():
    cpu = get_target("cpu", mcpu="cooperlake").hw()
    assert (cpu.vector_bits, cpu.fp32_lanes, cpu.int8_dot) == (512, 16, "vnni")
    assert cpu.structure == Structure(channels=16)                  # channel steps of the vector width, dense
    assert get_target("cpu", mcpu="haswell").hw().structure.channels == 8
    cuda = get_target("cuda").hw()
    assert cuda.structure == Structure(channels=32, blocks=(32, 1), nm=(2, 4))
    assert cuda.sparse_block == (32, 1) and cuda.int8_dot == "dp4a" and cuda.warp_size == 32
    arm = get_target("arm-sve", vector_bits=512).hw()
    assert arm.structure.unstructured and arm.int8_dot == "usdot" and arm.sve_vector_bits == 512
    assert arm.vector_bits is None                                   # scalable: no fixed width


def test_describe_is_json_and_keeps_the_manifest_keys():
    d = get_target("cuda").describe()
    assert json.loads(json.dumps(d)) == d
    assert d["sparse_block"] == [32, 1] and d["structure"] == {"channels": 32, "blocks": [32, 1], "nm": [2, 4],
                                                                "unstructured": False}
    c = get_target("cpu", mcpu="cooperlake").describe()
    assert (c["vector_bits"], c["fp32_lanes"], c["int8_dot"]) == (512, 16, "vnni")


@pytest.mark.parametrize("make,needle", [
    (lambda: Structure(channels=0), "channels"),
    (lambda: Structure(blocks=(0, 4)), "pair of positive"),
    (lambda: Structure(nm=(4, 2)), "fewer"),
    (lambda: HardwareInfo(fp32_lanes=True), "fp32_lanes"),
    (lambda: HardwareInfo(structure={"channels": 16}), "Structure"),
])
def test_malformed_descriptions_are_refused(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_pass_context_takes_the_typed_description_only():
    assert PassContext().hw is GENERIC and GENERIC.structure.channels == 16
    with pytest.raises(TypeError, match="HardwareInfo"):
        PassContext(hw={"fp32_lanes": 16})


def test_passes_declare_the_defaults_they_take_on_a_target():
    hw = get_target("cuda").hw()
    assert get_pass_class("prune-channels").target_defaults(hw) == {"round_to": 32}
    assert get_pass_class("factorize-lowrank").target_defaults(hw) == {"round_to": 32}
    assert get_pass_class("sparsify").target_defaults(hw) == {"block": "32x1"}
    assert get_pass_class("sparsify").target_defaults(get_target("arm-sve").hw()) == {"block": "1x1"}


def test_cli_passes_shows_the_target_defaults(capsys):
    assert cli.main(["passes", "--target", "cpu", "--target-option", "mcpu=cooperlake"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("target cpu: 512-bit vectors, channels in steps of 16")
    assert "round_to: int = 0 (on cpu: 16)" in out
    assert cli.main(["passes", "--target", "cuda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"]["structure"]["blocks"] == [32, 1]
    assert data["passes"]["sparsify"]["options"]["block"]["on_target"] == "32x1"
    assert cli.main(["passes"]) == 0 and "(on " not in capsys.readouterr().out


def test_cli_passes_unknown_target_is_one_line(capsys):
    assert cli.main(["passes", "--target", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown target 'tpu'" in err
