#!/usr/bin/env bash
# Ray for a machine without internet (the lent GPU machines: Python 3.12, no ray, 64 MiB per call).
#   benchmarks/ray_wheels.sh            (here, in the repository root, where pip can download)
# writes two folders that git ignores: .raywhl-a/ (the first 40 MiB of the ray wheel) and .raywhl-b/ (the
# rest, plus jsonschema and its three dependencies, the only ones of ray's the GPU image lacks). The ray
# wheel (~76 MiB) is larger than one call may carry, so it travels in two calls on one warm machine:
#   call 1, carry [".raywhl-a"]:  mkdir -p /tmp/raywhl && cp .raywhl-a/ray.part-* /tmp/raywhl/
#   call 2, carry [".raywhl-b"]:  cat /tmp/raywhl/ray.part-* .raywhl-b/ray.part-* > /tmp/raywhl/$(cat .raywhl-b/NAME) &&
#       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#           /tmp/raywhl/*.whl .raywhl-b/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 -c 'import ray'
# (/tmp/site stays while the machine is warm; later calls only need the export.)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${RAY_VERSION:-2.60.0}
PYVER=${PYVER:-3.12}
for d in .raywhl-a .raywhl-b; do
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"
    rm -rf "$d" && mkdir -p "$d"
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$TMP" "ray==$VERSION" jsonschema jsonschema-specifications referencing rpds-py
WHEEL=$(cd "$TMP" && ls ray-*.whl)
split -b 40M "$TMP/$WHEEL" "$TMP/ray.part-"
mv "$TMP"/ray.part-aa .raywhl-a/
mv "$TMP"/ray.part-a[b-z] .raywhl-b/
mv "$TMP"/*.whl .raywhl-b/ 2>/dev/null || true
rm -f .raywhl-b/"$WHEEL"
echo "$WHEEL" > .raywhl-b/NAME
du -sh .raywhl-a .raywhl-b
