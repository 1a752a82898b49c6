#!/usr/bin/env bash
# Mutation testing of one module against the tests that cover it; without MODULE, list the modules.
#   bash bench/mutation.sh losses
# The table of modules and their tests is in bench/mutation.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n 10 python bench/mutation.py "$@"
