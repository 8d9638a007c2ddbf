"""lower-int8's 256-entry tables applied to an 8-bit tensor in one kernel.

With AVX-512 VBMI, 64 lookups take two vpermi2b (each picks bytes from two 64-byte registers by the low seven bits
of every index byte: one covers entries 0-127, the other 128-255) and one blend on the index's top bit: about
four instructions per 64 values, where a gather of bytes costs a load and an insert per value. Without VBMI the
rewrite leaves TVM's take (correct, scalar)."""
from __future__ import annotations

from .intrinsics import KERNEL_ATTR
from .target_facts import x86_features

VBMI_PERMUTE = "llvm.x86.avx512.vpermi2var.qi.512"
LANES = 64
PARALLEL_MIN = 1 << 15      # values: below this one thread does the whole table lookup (no parallel launch)


def has_vbmi(target) -> bool:
    """Whether the target's code may use AVX-512 VBMI (vpermi2b): its mcpu's or mattr's features."""
    return "vbmi" in (x86_features(target) or ())


def table_kernel(total: int, in_dtype: str, out_dtype: str, cores: int):
    """PrimFunc (X [total] in_dtype, Tab [256] out_dtype, Y [total] out_dtype): Y[i] = Tab[byte of X[i]], 64 values
    per step with vpermi2b; the last total % 64 values one at a time."""
    from tvm.script import tirx as T

    nvec, tail = divmod(total, LANES)
    start = nvec * LANES
    loop = T.parallel if total >= PARALLEL_MIN and cores > 1 else T.serial
    vin, vout = f"{in_dtype}x64", f"{out_dtype}x64"

    # helpers called while the script is parsed (one expression each: a local would be a per-iteration buffer)
    def tab(buf, q):          # table entries 64q .. 64q+63 as one vector
        return T.reinterpret(buf.vload([q * 64], dtype=vout), dtype="int8x64")

    def index(buf, i, dtype):     # the 64 index bytes of step i
        return T.reinterpret(buf.vload([i * 64], dtype=vin), dtype=dtype)

    def permute(buf, tb, i, q):   # vpermi2b: entries of table quarters q, q+1 picked by the low 7 bits
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(VBMI_PERMUTE), tab(tb, q),
                                       index(buf, i, "int8x64"), tab(tb, q + 1), dtype="int8x64")

    @T.prim_func(s_tir=True)
    def main(X: T.Buffer((total,), in_dtype), Tab: T.Buffer((256,), out_dtype), Y: T.Buffer((total,), out_dtype)):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):        # a root block holding one opaque block: what the passes over the whole
            with T.sblock("lookup"):  # module (SplitLayoutRewritePreproc) expect of every PrimFunc
                T.reads(X[0:total], Tab[0:256])
                T.writes(Y[0:total])
                for i in loop(nvec):
                    Y[T.ramp(i * 64, 1, 64)] = T.reinterpret(T.Select(
                        index(X, i, "uint8x64") >= T.broadcast(T.uint8(128), 64),
                        permute(X, Tab, i, 2), permute(X, Tab, i, 0)), dtype=vout)
                for j in T.serial(tail):
                    Y[start + j] = Tab[T.Cast("int32", T.reinterpret(X[start + j], dtype="uint8"))]

    return main.with_attr(KERNEL_ATTR, "table_lookup")
