# Source this on the workplace's lent GPU machine, in the checkout's root, with .device carried
# (bash scripts/device_bundle.sh builds it here):   source scripts/device_env.sh
# Installs the carried wheels into /tmp/photoswap-site (no registry is reached) and points the scripts at the
# machine's python3 (which holds CUDA PyTorch) and at /tmp/photoswap-cache (ComfyUI, extracted from the carried wheel,
# and the random checkpoints: outside the checkout, so they stay while the machine is warm; a carried path is replaced
# on every call).
if [ ! -d .device/wheels ]; then
  echo "device_env: no .device/wheels here: run 'bash scripts/device_bundle.sh' on the dev machine and carry .device" >&2
  return 2 2>/dev/null || exit 2
fi
if [ "$(cat .device/python-version)" != "$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" ]; then
  echo "device_env: the wheels in .device are for Python $(cat .device/python-version), python3 here is another" >&2
  return 2 2>/dev/null || exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/photoswap-site \
  .device/wheels/*.whl || { return 2 2>/dev/null || exit 2; }
mkdir -p /tmp/photoswap-cache/downloads && cp -n .device/cache/downloads/*.whl /tmp/photoswap-cache/downloads/
export PYTHONPATH="/tmp/photoswap-site${PYTHONPATH:+:$PYTHONPATH}"
export PHOTOSWAP_CACHE=/tmp/photoswap-cache PHOTOSWAP_PYTHON=python3 PHOTOSWAP_DEVICE=cuda PYTHONUNBUFFERED=1
