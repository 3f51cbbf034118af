#!/usr/bin/env bash
# Prepares, on this machine, what scripts/device_check.sh needs on a lent GPU machine (see the device tool's README):
#
#   bash scripts/device_prepare.sh CIFAR10_ARCHIVE     # e.g. ../shared/data/cifar-10-python.tar.xz
#
# It writes, into git-ignored folders of the repository root:
#   .whl/     wheels of the packages that machine lacks: hydra-core, omegaconf, antlr4-python3-runtime (pure Python;
#             the versions this checkout's .venv runs, else the pinned ones below)
#   .devdata/ the CIFAR-10 archive in pieces of at most 60 MiB: one call carries at most 64 MiB, repository included
# and prints the device calls that carry them, one piece per call, back to back (the machine goes back 30 s after
# a call; what one call leaves in /tmp stays for the next while it is warm). The last call checks the joined
# archive's SHA-256, so pieces lost with a machine given back in between stop it before any GPU work. Its settings
# are sized to leave time for a rerun out of 15 minutes of device time; device_check.sh's header lists them all.
set -euo pipefail
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
    echo "usage: bash scripts/device_prepare.sh CIFAR10_ARCHIVE (the cifar-10-python .tar.gz or .tar.xz)" >&2
    exit 2
fi
archive=$(realpath "$1")
name=$(basename "$archive")
cd "$(dirname "$0")/.."  # the repository root: the device call sends it, with the carried folders
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.devdata/; do
    grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >> "$exclude"
done
python=.venv/bin/python
[ -x "$python" ] || python=python3
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
mkdir -p .whl
rm -f .whl/hydra_core-*.whl .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl  # one version of each there
"$python" -m pip wheel -q --no-deps -w .whl "hydra-core==$(version hydra-core 1.3.8)" \
    "omegaconf==$(version omegaconf 2.3.1)" "antlr4-python3-runtime==$(version antlr4-python3-runtime 4.9.3)"
rm -rf .devdata
mkdir .devdata
split -b 60M "$archive" ".devdata/$name.part-"
pieces=(.devdata/*.part-*)
there=/tmp/cifar  # where the pieces gather on the device machine (its scratch space, not this machine's)
sum=$(sha256sum "$archive" | cut -d' ' -f1)
echo "wheels: $(ls .whl | tr '\n' ' ')"
echo "data: ${#pieces[@]} piece(s) of $name, SHA-256 $sum"
echo
echo "device calls (run's carry and command), back to back:"
last=$((${#pieces[@]} - 1))
for i in "${!pieces[@]}"; do
    piece=${pieces[$i]}
    if [ "$i" -lt "$last" ]; then
        echo "  carry [\"$piece\"]"
        echo "  command: mkdir -p $there && cp $piece $there/"
    else
        echo "  carry [\".whl\", \"$piece\"], timeout_s 480"
        echo "  command: mkdir -p $there && cp $piece $there/ && cat $there/$name.part-* > $there/$name &&" \
             "echo '$sum  $there/$name' | sha256sum -c && tar -xf $there/$name -C $there &&" \
             "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target" \
             "/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && BUNDLE=\$OUT/device_check.tgz" \
             "ACCURACY='--accuracy-epochs 2 --accuracy-seeds 2 --accuracy-models resnet18_cifar'" \
             "PRECISION='epochs=2 seed=0,1' bash scripts/device_check.sh $there /tmp/device_check"
    fi
done
