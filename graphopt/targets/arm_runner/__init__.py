"""The native runner for arm-sve artifacts: runner.cc (C++, linked against the aarch64 TVM runtime) and
build.py, which fetches the aarch64 TVM wheels and builds the runner into a cache folder."""
