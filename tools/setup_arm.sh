#!/usr/bin/env bash
# Set up the arm-sve target on an x86-64 Debian/Ubuntu machine (run after tools/setup.sh):
#   1. apt: the aarch64 GNU toolchain (links model.so), binutils (objdump) and qemu-user (runs it);
#   2. pip download: the aarch64 apache-tvm / apache-tvm-ffi wheels matching the installed TVM, unpacked
#      (libtvm_runtime.so, libtvm_ffi.so, headers) into $GRAPHOPT_ARM_HOME (default ~/.cache/graphopt/arm_runner);
#   3. builds graphopt's native runner (graphopt/targets/arm_runner/runner.cc) there with aarch64-linux-gnu-g++.
# Idempotent: what is already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PKGS=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user)

missing=()
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ aarch64-linux-gnu-objdump qemu-aarch64; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || missing+=("aarch64 libc")
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup_arm: installing ${PKGS[*]} (missing: ${missing[*]})"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "setup_arm: need root (or sudo) to apt-get install ${PKGS[*]}" >&2; exit 1; }
        SUDO="sudo"
    fi
    # wait for another apt/dpkg run (other users of a shared machine) instead of failing
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${PKGS[@]}"
fi

if [ ! -x "$PY" ]; then
    echo "setup_arm: $PY not found; run tools/setup.sh first (or set PYTHON)" >&2
    exit 1
fi
"$PY" -m graphopt.targets.arm_runner.build
# check: the runner starts under qemu (prints its usage and exits 2 without arguments)
RUNNER=$("$PY" -c "from graphopt.targets.arm_runner.build import runner_path; print(runner_path())")
set +e
QEMU_LD_PREFIX=/usr/aarch64-linux-gnu qemu-aarch64 -cpu max,sve=on,sve-default-vector-length=32 "$RUNNER" >/dev/null 2>&1
rc=$?
set -e
if [ "$rc" -ne 2 ]; then
    echo "setup_arm: $RUNNER does not start under qemu-aarch64 (exit status $rc)" >&2
    exit 1
fi
echo "setup_arm: arm-sve ready (qemu-aarch64 $(qemu-aarch64 --version | head -1 | awk '{print $3}'), runner $RUNNER)"
