"""graphopt.profiling: graphopt kernels and onnxruntime trace events tied to the ONNX node they compute."""
import pytest
from onnx import helper

import onnx_builders as ob
from graphopt.profiling import ModelIndex, kernel_op, map_kernels, ort_node

pytestmark = pytest.mark.fast


def _two_convs_same_sizes():
    """x -> down (1x1 stride 2) and conv1 (3x3 stride 2): equal input and output sizes, different weights."""
    return ob.model([helper.make_node("Conv", ["x", "wd"], ["d"], name="down", strides=[2, 2]),
                     helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
                     helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["cb"], name="bn"),
                     helper.make_node("Relu", ["cb"], ["cr"], name="relu"),
                     helper.make_node("Add", ["d", "cr"], ["y"], name="add")],
                    [ob.vi("x", [1, 8, 8, 8])], [ob.vi("y", [1, 16, 4, 4])],
                    [("wd", ob.rnd(16, 8, 1, 1)), ("w1", ob.rnd(16, 8, 3, 3)), ("s", ob.rnd(16)), ("b", ob.rnd(16)),
                     ("m", ob.rnd(16)), ("v", 1 + abs(ob.rnd(16)))])


def test_kernels_map_to_nodes_by_packed_weight_size_not_order():
    index = ModelIndex(_two_convs_same_sizes())
    # TVM may run conv1 before down; its weight comes packed (OIHW16o), the sizes stay
    calls = [{"kernel": "fused_conv2d1_add_relu_prepacked", "shapes": [[1, 8, 8, 8], [1, 8, 3, 3, 16], [1, 16, 4, 4]]},
             {"kernel": "vm.builtin.alloc_tensor", "shapes": []},
             {"kernel": "fused_conv2d_add1_prepacked", "shapes": [[1, 8, 8, 8], [1, 8, 1, 1, 16], [1, 16, 4, 4],
                                                                 [1, 16, 4, 4]]}]
    map_kernels(calls, index)
    assert [(c["node"], c["op"]) for c in calls] == [("conv1", "Conv"), (None, "vm builtins"), ("down", "Conv")]


def test_quantized_weights_behind_dequantize_linear_tell_convs_apart():
    """QDQ graphs feed a conv its weight through DequantizeLinear of an int8 initializer: that initializer's size
    tells ResNet's 1x1 stride-2 downsample (56x56x256 -> 28x28x512) from the block's first 1x1 conv (56x56x256 ->
    56x56x128, the same element counts, earlier in graph order), which the int8 kernel was mislabeled as."""
    import numpy as np
    from onnx import numpy_helper

    def conv(name, w, out, **kw):
        return [helper.make_node("DequantizeLinear", [f"{w}_q", f"{w}_s"], [w], name=f"{name}_dq"),
                helper.make_node("Conv", ["x", w], [out], name=name, **kw)]
    m = ob.model(conv("conv1", "w1", "c") + conv("down", "wd", "d", strides=[2, 2]),
                 [ob.vi("x", [1, 16, 8, 8])], [ob.vi("c", [1, 8, 8, 8]), ob.vi("d", [1, 32, 4, 4])], [])
    for name, shape in (("w1", (8, 16, 1, 1)), ("wd", (32, 16, 1, 1))):
        m.graph.initializer.extend([numpy_helper.from_array(np.ones(shape, np.int8), f"{name}_q"),
                                    numpy_helper.from_array(np.float32(0.1), f"{name}_s")])
    calls = [{"kernel": "graphopt_int8_conv3", "shapes": [[1, 8, 8, 16], [2, 1, 1, 4, 16, 4], [32], [1, 4, 4, 32]]},
             # conv1's 8 output channels padded to 16 in the kernel's NHWC output
             {"kernel": "graphopt_int8_conv4", "shapes": [[1, 8, 8, 16], [1, 1, 1, 4, 16, 4], [16], [1, 8, 8, 16]]}]
    map_kernels(calls, ModelIndex(m))
    assert [c["node"] for c in calls] == ["down", "conv1"]


def test_kernel_op_labels():
    assert kernel_op("fused_matmul4_add3_divide1_erf_add4_multiply_prepacked") == ("MatMul", ("MatMul", "Gemm"))
    assert kernel_op("graphopt_int8_dwconv3")[0] == "Conv"
    assert kernel_op("fused_transpose2_reshape1") == ("transpose", ())
    assert kernel_op("vm.builtin.alloc_storage") == ("vm builtins", ())


def test_onnxruntime_events_map_to_nodes():
    index = ModelIndex(_two_convs_same_sizes())
    assert ort_node("conv1_kernel_time", "Conv", index) == "conv1"
    assert ort_node("conv1/MatMulAddFusion_kernel_time", "Gemm", index) == "conv1"     # a fusion named after its node
    assert ort_node("cr_nchwc_kernel_time", "Conv", index) == "conv1"    # named after its output: walk back to the Conv
    assert ort_node("ReorderOutput_kernel_time", "ReorderOutput", index) is None
