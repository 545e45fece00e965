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
# The server's own dependencies (fastapi, uvicorn, pydantic), for `STEPS=serve`: wheels for
# the image's Python 3.12 in .whl/serve/ (`pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 -d .whl/serve fastapi starlette
# uvicorn pydantic pydantic_core annotated-types annotated-doc typing-inspection
# opentelemetry-api typing_extensions`, the versions this machine's tests use).
if ! python3 -c "import fastapi" 2>/dev/null && compgen -G ".whl/serve/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/serve/*.whl
  case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
