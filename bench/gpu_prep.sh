#!/usr/bin/env bash
# Prepares, on this machine, what bench/gpu_suite.sh needs on a lent GPU machine, where nothing
# can be fetched (its image has torch, triton, transformers, grpcio, pytest...: KINDS.md in the
# device tool's library):
#   .whl/       wheels of the project's dependencies that image lacks (or holds in other versions),
#               for its Python 3.12; both folders are git-ignored
#   .gpu/side   the demo model's config and tokenizer files (the suite draws random weights there)
# and prints the command to give the device tool's run, with carry [".whl", ".gpu"]: it unpacks
# the wheels into /tmp/site, puts that and the checkout on PYTHONPATH and runs the given stages.
#
#   bash bench/gpu_prep.sh [STAGE...]        # default stages: roofline exact
#
# roofline first: it gives the issue's figure, and one device call may run 600 s at most, so
# the exact stage (up to 300 s) comes after it and is the one cut short if time runs out.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=${*:-roofline exact}

rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  platformdirs redis "llguidance>=1.9,<2" pytest-asyncio \
  "grpcio==1.85.3" "protobuf==7.36.2" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1"

demo=$(python3 -c 'from scalellm.models.prepare import prepare_demo_model; print(prepare_demo_model())')
rm -rf .gpu/side && mkdir -p .gpu/side
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  if [ -f "$demo/$f" ]; then cp "$demo/$f" .gpu/side/; fi
done

du -sh .whl .gpu | sed 's/^/carry: /'
cat <<EOF
device run command (carry [".whl", ".gpu"]):
for w in .whl/*.whl; do python3 -m zipfile -e "\$w" /tmp/site; done; export PYTHONPATH=/tmp/site:\$PWD; bash bench/gpu_suite.sh .gpu/side .gpu/side \$OUT $stages
EOF
