#!/usr/bin/env bash
# Download, here, the wheels the device machine lacks (its image has torch, transformers,
# msgpack, pluggy, matplotlib, ... but not these), for its Python 3.12 on x86_64, into .whl/
# (ignored by git; the device tool carries it with carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 pyzmq==27.3.0 posix-ipc==1.3.2 \
    hydra-joblib-launcher==1.2.0
# hydra needs antlr4 4.9.*, published only as source: build its (pure Python) wheel here
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
