#!/usr/bin/env bash
# A second venv with the last transformers 4.x release, for the test that an exported student
# loads there with the logits it has under transformers 5 (tests/test_export.py).
# torch is not installed twice: a .pth file appends the main venv's site-packages, after this
# venv's own, so its transformers 4.x, tokenizers and huggingface-hub shadow the main ones.
#   scripts/tf4_venv.sh MAIN_VENV OUT_VENV
set -euo pipefail
main=${1:?the main venv}
out=${2:?the venv to create}
test -f "$out/.kvd-installed" && exit 0
"$main/bin/python" -m venv "$out"
"$out/bin/pip" install -q --no-deps transformers==4.57.6
"$out/bin/pip" install -q "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<0.23" regex safetensors numpy
site=$("$out/bin/python" -c "import site; print(site.getsitepackages()[0])")
"$main/bin/python" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))" \
    > "$site/zz-kvd-main-venv.pth"
touch "$out/.kvd-installed"
