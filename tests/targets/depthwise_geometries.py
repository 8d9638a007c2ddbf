"""The depthwise conv geometries the row-reduction kernels (int8/dw_quads.py, bf16/dw_pairs.py) are tested on:
every (kernel, stride) they take, partial row blocks and tiles, padded channels, asymmetric padding."""

GEOMETRIES = [  # C, H, W, K, stride, pad (top, left, bottom, right)
    (32, 12, 16, 3, 1, (1, 1, 1, 1)),
    (48, 9, 9, 3, 1, (1, 1, 1, 1)),        # partial row block and partial tile
    (16, 11, 13, 3, 2, (1, 1, 1, 1)),
    (24, 10, 10, 3, 2, (0, 0, 1, 1)),      # channels padded to 32; TF-style asymmetric padding
    (32, 14, 14, 5, 1, (2, 2, 2, 2)),
    (16, 7, 7, 5, 1, (2, 2, 2, 2)),        # fewer rows than a block of four
    (32, 15, 15, 5, 2, (2, 2, 2, 2)),
]


def geometry_id(g) -> str:
    return "c{}_{}x{}_k{}_s{}".format(*g[:5])
