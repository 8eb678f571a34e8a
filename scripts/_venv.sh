# Shared by scripts/demo and scripts/test: make_venv DIR EXTRAS
# Creates DIR with the project installed (strict editable mode) with the given extras.
# Re-running updates it in place, so new modules and dependencies are picked up.
make_venv() {
  local dir=$1 extras=$2 py=${PYTHON:-python3}
  if [ ! -x "$dir/bin/python" ]; then
    "$py" -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --disable-pip-version-check \
    -e ".[$extras]" --config-settings editable_mode=strict 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$dir/bin/python" -c "import onnxslim_edge" || { echo "install of $dir failed" >&2; return 1; }
}
