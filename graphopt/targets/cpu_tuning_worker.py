"""Runs inside MetaSchedule's builder and runner worker processes (imported by module path, so keep it importable
and light).

Builders: registers a build function that does what MetaSchedule's default build does minus the import of
tvm.s_tir.tensor_intrin, which costs 30-50 s per fresh worker (mostly CUDA intrinsics) and made half the
builds time out. Artifacts are tar archives of object files for local measurement (linked by the runner) and
shared libraries linked here for measurement on an RPC device, which then needs only the TVM runtime, not a
compiler.

RPC: MetaSchedule's own session request (TrackerSession.request) retries a refused tracker for a minute per try
and waits forever for a free server; request_session bounds both and fails with one line (RPCUnavailable)."""
from __future__ import annotations

BUILD_FUNC = "graphopt.cpu_tuning.build"
EXPORT_FUNC = "graphopt.cpu_tuning.export"
EXPORT_SO_FUNC = "graphopt.cpu_tuning.export_so"
ARTIFACT_PREFIX = "graphopt-ms-"


def _build(mod, target, _params):
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return build(mod, target=target)


def _export(rt_mod) -> str:
    """Tar of object files in a fresh folder (the local runner links it beside the tar)."""
    import os
    import tempfile

    from tvm.support.tar import tar

    path = os.path.join(tempfile.mkdtemp(prefix=ARTIFACT_PREFIX), "tvm_tmp_mod." + tar.output_format)
    rt_mod.export_library(path, fcompile=tar)
    return path


def _export_so(rt_mod) -> str:
    """Shared library linked here with the host's C compiler, for RPC devices (which load it with dlopen)."""
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix=ARTIFACT_PREFIX), "tvm_tmp_mod.so")
    rt_mod.export_library(path)
    return path


def initialize() -> None:
    """Worker initializer: register the build/export functions under their global names."""
    import tvm_ffi

    tvm_ffi.register_global_func(BUILD_FUNC, _build, override=True)
    tvm_ffi.register_global_func(EXPORT_FUNC, _export, override=True)
    tvm_ffi.register_global_func(EXPORT_SO_FUNC, _export_so, override=True)


def in_process_builder(export: str = "tar"):
    """A MetaSchedule builder that builds in the calling process: no worker start-up per batch (seconds on a
    loaded 2-core machine), at the price of no build timeout. Used for small trial budgets.
    export: "tar" (local runner) or "so" (RPC runner)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    f_export = _export_so if export == "so" else _export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(f_export(_build(bi.mod, bi.target, None)), None))
                except Exception as e:  # noqa: BLE001 - a candidate that does not build is reported, not raised
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def remove_artifact(path: str | None) -> None:
    """Remove a build artifact together with its folder (and what the local runner linked beside it)."""
    import os
    import shutil

    if not path:
        return
    folder = os.path.dirname(path)
    if os.path.basename(folder).startswith(ARTIFACT_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


# ---------------------------------------------------------------- RPC

class RPCUnavailable(RuntimeError):
    """The tracker or a device cannot be used; the message is one line saying why."""


def _tracker_socket(host: str, port: int, timeout: float):
    import socket
    import struct

    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e) or type(e).__name__).lower()
        raise RPCUnavailable(f"cannot reach the RPC tracker at {host}:{port} ({why})") from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except OSError:
        magic = None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RPCUnavailable(f"{host}:{port} does not answer as a TVM RPC tracker")
    return sock


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict:
    """The tracker's summary: {"queue_info": {key: {"free", "pending"}}, "server_info": [{"key": "server:KEY",
    "addr": ...}]}."""
    from tvm.rpc import base

    sock = _tracker_socket(host, port, timeout)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except OSError as e:
        raise RPCUnavailable(f"the RPC tracker at {host}:{port} did not answer ({e})") from None
    finally:
        sock.close()
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise RPCUnavailable(f"the RPC tracker at {host}:{port} gave an invalid summary: {value!r}")
    return value[1]


def request_session(host: str, port: int, key: str, priority: int = 1, session_timeout: float = 0,
                    wait: float = 60.0, connect_timeout: float = 10.0):
    """An RPC session on a server registered under key, waiting at most `wait` seconds for a free one."""
    import threading

    from tvm import rpc
    from tvm.rpc import base

    sock = _tracker_socket(host, port, connect_timeout)
    try:
        sock.settimeout(wait)
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
        value = base.recvjson(sock)
    except TimeoutError:
        raise RPCUnavailable(f"no free RPC server for key '{key}' at the tracker {host}:{port} "
                             f"within {wait:g} s") from None
    except OSError as e:
        raise RPCUnavailable(f"the RPC tracker at {host}:{port} dropped the request for key '{key}' ({e})") from None
    finally:
        sock.close()  # a request still queued at the tracker is dropped with the connection
    if not isinstance(value, list) or value[0] != base.TrackerCode.SUCCESS:
        raise RPCUnavailable(f"the RPC tracker at {host}:{port} refused the request for key '{key}': {value!r}")
    url, sport, matchkey = value[1]
    out = {}

    def connect():
        try:
            out["sess"] = rpc.connect(url, sport, matchkey, session_timeout)
        except Exception as e:  # noqa: BLE001 - reported below as one line
            out["err"] = e

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(connect_timeout + 5)
    if "sess" in out:
        return out["sess"]
    if t.is_alive():
        why = "timed out"
    else:
        lines = [ln.strip() for ln in str(out.get("err", "")).splitlines() if ln.strip()]
        why = lines[0] if lines else type(out.get("err")).__name__
    raise RPCUnavailable(f"the tracker {host}:{port} gave the server {url}:{sport} for key '{key}' but connecting "
                         f"to it failed ({why}); if the device is behind NAT, start its server with "
                         f"--custom-addr ADDRESS_SEEN_FROM_HERE")


def create_session(rpc_config, wait: float = 60.0, connect_timeout: float = 10.0):
    """f_create_session for MetaSchedule's RPCRunner (bind wait/connect_timeout with functools.partial)."""
    return request_session(rpc_config.tracker_host, int(rpc_config.tracker_port), rpc_config.tracker_key,
                           priority=rpc_config.session_priority, session_timeout=rpc_config.session_timeout_sec,
                           wait=wait, connect_timeout=connect_timeout)
