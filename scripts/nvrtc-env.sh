# Sourced: installs the NVRTC wheel if pip can, and puts its library on LD_LIBRARY_PATH.
if python3 -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc>=13,<14" 2>/dev/null; then
  _nvrtc_dir="$(python3 - <<'PY'
import glob, os, site
for base in site.getsitepackages() + [site.getusersitepackages()]:
    for p in glob.glob(os.path.join(base, "nvidia", "**", "libnvrtc.so*"), recursive=True):
        print(os.path.dirname(p)); raise SystemExit
PY
)"
  if [ -n "$_nvrtc_dir" ]; then
    export LD_LIBRARY_PATH="$_nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "nvrtc: $_nvrtc_dir"
  fi
else
  echo "nvrtc: wheel not installable here; the kernel-compile test will skip"
fi
