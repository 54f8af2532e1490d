#!/usr/bin/env bash
# Setup for the worker matrix (network: here only, never in a test). Fills
# $2/wheelhouse with wheels, for the pyenv interpreter $1 (3.9: its newest patch release), of what the worker-side tests
# install beside the keybrake wheel: httpx, dramatiq[redis], the stripe SDK and, where
# PyPI has a release for that Python, apache-beam (else $2/beam-unavailable says why).
# --use-pep517: the sdists among Beam's dependencies (crcmod, docopt) build on old pips too.
set -euo pipefail
version=$1 dir=$2
rm -rf "$dir"
mkdir -p "$dir/wheelhouse"
if ! py=$(PYENV_VERSION=$version pyenv which python 2>/dev/null); then
  # The test says so (a skip, or a failure where KEYBRAKE_WORKER_MATRIX=required).
  echo "worker matrix: no Python $version in pyenv (pyenv install $version); not checked" >&2
  touch "$dir/.done"
  exit 0
fi
"$py" -m pip wheel --quiet --disable-pip-version-check --use-pep517 --prefer-binary \
  -w "$dir/wheelhouse" 'httpx>=0.27' 'dramatiq[redis]>=1.17' 'stripe>=10'
if ! "$py" -m pip wheel --quiet --disable-pip-version-check --use-pep517 --prefer-binary \
  -w "$dir/wheelhouse" 'apache-beam>=2.60' >"$dir/beam.log" 2>&1; then
  {
    echo "no installable apache-beam>=2.60 wheel for Python $version on PyPI:"
    tail -n 3 "$dir/beam.log"
  } >"$dir/beam-unavailable"
fi
"$py" -c 'import sys; print(sys.version.split()[0])' >"$dir/python-version"
touch "$dir/.done"
