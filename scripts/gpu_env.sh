# Source from the repository root on the device machine, before any command that imports
# the engine: the device image lacks `gguf`, so the wheel carried in .whl/ is installed
# into /tmp/site (once a machine) and put on PYTHONPATH with the repository itself, e.g.
#   source scripts/gpu_env.sh && python3 .carry/some_script.py
# (two device calls in session 25 failed at once without it).
if ! python3 -c "import gguf" 2>/dev/null; then
  if [ ! -d /tmp/site/gguf ] && compgen -G ".whl/gguf-*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target /tmp/site .whl/gguf-*.whl
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
