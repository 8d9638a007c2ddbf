"""Fetch the aarch64 TVM runtime and build graphopt's native arm runner.

    python -m graphopt.targets.arm_runner.build          # what tools/setup_arm.sh runs

The runner runs arm-sve artifacts (model.so, a Relax VM executable) under qemu-aarch64 or on an aarch64 host.
Everything lives in one cache folder, $GRAPHOPT_ARM_HOME or ~/.cache/graphopt/arm_runner:

    wheels/                      the aarch64 apache-tvm / apache-tvm-ffi wheels (pip download)
    lib/libtvm_runtime.so        unpacked from them, plus lib/VERSIONS.json (which versions)
    lib/libtvm_ffi.so
    include/                     tvm_ffi's C++ headers (and dlpack) from the apache-tvm-ffi wheel
    bin/graphopt-arm-runner      built with aarch64-linux-gnu-g++ (RUNPATH $ORIGIN/../lib), plus a .json stamp

The wheel versions are those of the apache-tvm / apache-tvm-ffi installed next to graphopt, so the runtime
matches the compiler that produced model.so. The runner is rebuilt when runner.cc or the runtime changes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

SOURCE = Path(__file__).with_name("runner.cc")
RUNNER = "graphopt-arm-runner"
CXX = "aarch64-linux-gnu-g++"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
#: manylinux tag of the aarch64 wheels on PyPI (manylinux2014 = 2_17 is too old for these wheels)
PLATFORM = "manylinux_2_28_aarch64"
EM_AARCH64 = 183
SETUP_HINT = "run tools/setup_arm.sh"


class SetupError(RuntimeError):
    """Something the arm runner needs is missing; the message says what (one line)."""


def home() -> Path:
    env = os.environ.get("GRAPHOPT_ARM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphopt" / "arm_runner"


def tvm_versions() -> dict:
    return {"apache-tvm": metadata.version("apache-tvm"), "apache-tvm-ffi": metadata.version("apache-tvm-ffi")}


def lib_dir(h: Path | None = None) -> Path:
    return (h or home()) / "lib"


def runner_path(h: Path | None = None) -> Path:
    return (h or home()) / "bin" / RUNNER


def elf_machine(path: Path) -> int | None:
    """e_machine of an ELF file (183 = aarch64, 62 = x86-64), None when it is not ELF."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


@contextlib.contextmanager
def _locked(h: Path):
    """Serialize setup between processes (pytest workers may load artifacts at the same time)."""
    h.mkdir(parents=True, exist_ok=True)
    with open(h / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def runtime_problem(h: Path | None = None) -> str | None:
    """Why the unpacked aarch64 runtime cannot be used (missing, or another TVM version), or None."""
    h = h or home()
    for name in RUNTIME_LIBS:
        if elf_machine(lib_dir(h) / name) != EM_AARCH64:
            return f"the aarch64 TVM runtime is not installed ({lib_dir(h) / name} is missing)"
    have = _read_json(lib_dir(h) / "VERSIONS.json") or {}
    want = tvm_versions()
    if have != want:
        return (f"the aarch64 TVM runtime in {lib_dir(h)} is {have or 'of unknown version'}, "
                f"the compiler is {want}")
    return None


def runner_problem(h: Path | None = None) -> str | None:
    """Why the built runner is unusable or stale, or None."""
    h = h or home()
    exe = runner_path(h)
    if elf_machine(exe) != EM_AARCH64:
        return f"the arm runner is not built ({exe} is missing)"
    stamp = _read_json(exe.with_suffix(".json")) or {}
    if stamp.get("source_sha256") != _source_hash() or stamp.get("runtime") != tvm_versions():
        return f"the arm runner {exe} is out of date"
    return None


def fetch_runtime(h: Path | None = None, log=print) -> None:
    """pip-download the aarch64 wheels matching the installed TVM and unpack the runtime libraries and headers."""
    h = h or home()
    want = tvm_versions()
    wheels = h / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pyver = f"{sys.version_info.major}{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", PLATFORM,
           "--python-version", pyver, "-d", str(wheels)] + [f"{k}=={v}" for k, v in want.items()]
    log(f"arm: downloading the aarch64 wheels: {' '.join(f'{k}=={v}' for k, v in want.items())}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.startswith("ERROR")] or \
            (r.stderr or r.stdout).strip().splitlines()[-1:]
        raise SetupError(f"pip could not download the aarch64 TVM wheels: {' '.join(lines)}")

    def wheel(dist: str, version: str) -> Path:
        stem = dist.replace("-", "_")
        found = sorted(p for p in wheels.glob(f"{stem}-{version}-*.whl") if "aarch64" in p.name)
        if not found:
            raise SetupError(f"no aarch64 wheel for {dist}=={version} in {wheels}")
        return found[-1]

    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=h))
    try:
        (staging / "lib").mkdir()
        (staging / "include").mkdir()
        with zipfile.ZipFile(wheel("apache-tvm", want["apache-tvm"])) as z:
            _extract_lib(z, "libtvm_runtime.so", staging / "lib")
        with zipfile.ZipFile(wheel("apache-tvm-ffi", want["apache-tvm-ffi"])) as z:
            _extract_lib(z, "libtvm_ffi.so", staging / "lib")
            prefix = "tvm_ffi/include/"
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    dest = staging / "include" / name[len(prefix):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(name))
        if not (staging / "include" / "tvm" / "ffi" / "extra" / "module.h").is_file():
            raise SetupError("the apache-tvm-ffi wheel has no C++ headers (tvm_ffi/include)")
        (staging / "lib" / "VERSIONS.json").write_text(json.dumps(want, sort_keys=True) + "\n")
        for sub in ("lib", "include"):
            if (h / sub).exists():
                shutil.rmtree(h / sub)
            os.rename(staging / sub, h / sub)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"arm: aarch64 TVM runtime unpacked into {lib_dir(h)}")


def _extract_lib(z: zipfile.ZipFile, basename: str, dest: Path) -> None:
    names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == basename]
    if not names:
        raise SetupError(f"{basename} not found in {z.filename}")
    out = dest / basename
    out.write_bytes(z.read(sorted(names, key=len)[0]))
    if elf_machine(out) != EM_AARCH64:
        raise SetupError(f"{basename} from {z.filename} is not an aarch64 library")


def build_runner(h: Path | None = None, log=print) -> Path:
    """Compile runner.cc with the aarch64 cross compiler against the unpacked runtime."""
    h = h or home()
    if shutil.which(CXX) is None:
        raise SetupError(f"{CXX} not found")
    problem = runtime_problem(h)
    if problem:
        raise SetupError(problem)
    exe = runner_path(h)
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f".{RUNNER}.{os.getpid()}.tmp")
    cmd = [CXX, "-std=c++17", "-O2", str(SOURCE), f"-I{h / 'include'}", f"-L{lib_dir(h)}",
           # libtvm_runtime registers the Relax VM and the module loaders: keep it although no symbol is used
           "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed",
           "-Wl,-rpath,$ORIGIN/../lib", "-o", str(tmp)]
    log(f"arm: building {exe}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        err = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.strip().splitlines()[-1:]
        raise SetupError(f"building the arm runner failed: {err[0] if err else 'unknown error'}")
    os.replace(tmp, exe)
    exe.with_suffix(".json").write_text(json.dumps(
        {"source_sha256": _source_hash(), "runtime": tvm_versions(), "cxx": CXX}, sort_keys=True) + "\n")
    return exe


def ensure_runner(h: Path | None = None, log=lambda msg: None) -> Path:
    """The runner, (re)built when runner.cc changed and the runtime is present. Raises SetupError otherwise."""
    h = h or home()
    if runner_problem(h) is None and runtime_problem(h) is None:
        return runner_path(h)
    with _locked(h):
        problem = runtime_problem(h)
        if problem:
            raise SetupError(problem)
        if runner_problem(h):
            build_runner(h, log=log)
    return runner_path(h)


def setup(h: Path | None = None, log=print) -> Path:
    """Everything: fetch the runtime when missing or of another version, then build the runner when stale."""
    h = h or home()
    with _locked(h):
        if runtime_problem(h):
            fetch_runtime(h, log=log)
        if runner_problem(h):
            build_runner(h, log=log)
    exe = runner_path(h)
    log(f"arm: runner ready: {exe}")
    return exe


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", help="cache folder (default $GRAPHOPT_ARM_HOME or ~/.cache/graphopt/arm_runner)")
    ap.add_argument("--rebuild", action="store_true", help="fetch the runtime and build the runner again")
    args = ap.parse_args(argv)
    h = Path(args.home).expanduser() if args.home else home()
    try:
        if args.rebuild:
            with _locked(h):
                fetch_runtime(h)
                build_runner(h)
        else:
            setup(h)
    except SetupError as e:
        print(f"setup_arm: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
