#!/bin/sh
# the project's test command: its unit tests, and a report kept as an artifact
set -e
echo "testing on $(hostname) in $(pwd)"
mkdir -p out
python3 -m unittest -v check_calc 2> out/report.txt || { cat out/report.txt >&2; exit 3; }
echo "all tests passed"
