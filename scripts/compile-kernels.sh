#!/usr/bin/env bash
# Compiles every kernels/*.cu for a GPU architecture WITHOUT a GPU, the way the engine does at run
# time (NVRTC, kernels/common.cuh passed as an in-memory header, the same options as
# src/backend/cuda/kernels.rs), then assembles the PTX with `ptxas -v` and records registers,
# stack and spills per kernel. Fails on any NVRTC error or warning, any ptxas error, a kernel
# file without entry points, or (unless MAX_SPILL_BYTES says otherwise) any spill.
#
#   scripts/compile-kernels.sh                  # venv in target/cuda-venv, sm_90
#   CUDA_VENV=/work/cuda-venv ARCH=sm_90 OUT=kernels-sm_90.md scripts/compile-kernels.sh
#
# The venv gets PyPI nvidia-cuda-nvrtc / -runtime / -nvcc (+ the nvvm and crt they pull in),
# all 13.0.* to match the H200's driver 580 (CUDA 13.0). Prints the venv's lib folder on the
# last line as `LD_LIBRARY_PATH+=...` so callers can run NVRTC from Rust too.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-target/cuda-venv}
ARCH=${ARCH:-sm_90}
OUT=${OUT:-target/kernels-$ARCH.md}
MAX_SPILL_BYTES=${MAX_SPILL_BYTES:-0}
PKGS=("nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvcc==13.0.*"
      "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*")

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cu="$site/nvidia/cu13"
if [ ! -e "$cu/lib/libnvrtc.so.13" ] || [ ! -x "$cu/bin/ptxas" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PKGS[@]}"
fi
mkdir -p "$(dirname "$OUT")" target/kernels-ptx
# NVRTC dlopens libnvrtc-builtins by name: its folder must be on the loader path at start.
export LD_LIBRARY_PATH="$cu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

"$VENV/bin/python" - "$cu" "$ARCH" "$OUT" "$MAX_SPILL_BYTES" <<'PY'
import ctypes, glob, os, re, subprocess, sys, time

cu, arch, out, max_spill = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
nvrtc = ctypes.CDLL(os.path.join(cu, "lib", "libnvrtc.so.13"))
major, minor = ctypes.c_int(), ctypes.c_int()
nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
# Keep in sync with NVRTC_OPTIONS in src/backend/cuda/kernels.rs.
virtual = "compute_" + arch.split("_", 1)[1]
options = [f"--gpu-architecture={virtual}", "--std=c++17"]
header = open("kernels/common.cuh", "rb").read()

def check(code, what, prog=None):
    if code != 0:
        log = program_log(prog) if prog is not None else ""
        sys.exit(f"error: {what}: {nvrtc.nvrtcGetErrorString(code).decode()}\n{log}")

def program_log(prog):
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")

rows, failures = [], []
ptxas = os.path.join(cu, "bin", "ptxas")
t0 = time.time()
for path in sorted(glob.glob("kernels/*.cu")):
    unit = os.path.basename(path)[:-3]
    src = open(path, "rb").read()
    prog = ctypes.c_void_p()
    heads = (ctypes.c_char_p * 1)(header)
    names = (ctypes.c_char_p * 1)(b"common.cuh")
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 1, heads, names), f"{path}: create")
    opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    code = nvrtc.nvrtcCompileProgram(prog, len(options), opts)
    log = program_log(prog).strip()
    if code != 0:
        failures.append(f"{path}: NVRTC failed:\n{log}")
        continue
    if log:
        failures.append(f"{path}: NVRTC warnings (treated as errors):\n{log}")
    size = ctypes.c_size_t()
    check(nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size)), f"{path}: ptx size")
    buf = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetPTX(prog, buf), f"{path}: ptx")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    ptx_path = f"target/kernels-ptx/{unit}.ptx"
    open(ptx_path, "wb").write(buf.value)
    entries = re.findall(r"\.entry\s+(\w+)", buf.value.decode())
    if not entries:
        failures.append(f"{path}: no kernel entry points in the PTX")
    res = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx_path, "-o", f"target/kernels-ptx/{unit}.{arch}.cubin"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        failures.append(f"{path}: ptxas failed:\n{res.stderr}")
        continue
    # ptxas -v: "Compiling entry function 'X' for 'sm_90'", "Function properties for X",
    # "N bytes stack frame, N bytes spill stores, N bytes spill loads", "Used N registers, ..."
    current, props = None, {}
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1); props[current] = {"unit": unit}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            props[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            props[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            props[current]["smem"] = int(s.group(1)) if s else 0
    missing = set(entries) - set(props)
    if missing:
        failures.append(f"{path}: ptxas reported nothing for {sorted(missing)}")
    for name, p in props.items():
        rows.append((name, p))
        if p.get("spill_st", 0) + p.get("spill_ld", 0) > max_spill:
            failures.append(f"{name}: {p['spill_st']} bytes spill stores, {p['spill_ld']} bytes spill loads")

ptxas_ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
lines = [f"Kernels for {arch}: NVRTC {major.value}.{minor.value} ({' '.join(options)}), then `ptxas -arch={arch} -v` ({ptxas_ver}).", "",
         "| file | kernel | registers | stack (B) | spill stores (B) | spill loads (B) | smem (B) |",
         "|---|---|---|---|---|---|---|"]
for name, p in rows:
    lines.append(f"| {p['unit']}.cu | `{name}` | {p.get('regs', '?')} | {p.get('stack', '?')} | {p.get('spill_st', '?')} | {p.get('spill_ld', '?')} | {p.get('smem', 0)} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\n{len(rows)} kernels from {len(glob.glob('kernels/*.cu'))} files in {time.time() - t0:.1f} s; table in {out}")
if failures:
    print("\nFAILED:\n" + "\n\n".join(failures), file=sys.stderr)
    sys.exit(1)
PY
echo "LD_LIBRARY_PATH+=$cu/lib"
