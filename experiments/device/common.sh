# Sourced at the start of every device call (see README.md here): the commit the run measures, unbuffered
# output, the carried wheels (pure-Python peers and pins) first on PYTHONPATH, the GPU's name.
export PYTHONUNBUFFERED=1 MOE_LAB_GIT_COMMIT=$(cat .devrun/src.commit) MOE_LAB_GIT_DIRTY=0
export PY=/opt/torch/.venv/bin/python3
[ -x $PY ] || PY=python3
if [ ! -d /tmp/site ] && ls .devrun/wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devrun/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
