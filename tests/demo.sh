#!/usr/bin/env bash
# The offline demo, end to end, in one command (the README's quick start;
# docs/contributing.md: "Offline demo"):
#
#     bash tests/demo.sh [OUTPUT_DIR]          (default: ./demo-out)
#
# Starts tests/fakes/fake_nbia.py on a free port of 127.0.0.1 with faults and hostile data, waits
# until it listens, downloads its DEMO collection into OUTPUT_DIR/DEMO.tar.xz, checks the
# archive with the standard tools (xz -t, tar, md5sum -c) and stops the fake, whatever happens.
# Needs: python3 with requirements-test.txt installed (PYTHON=... to use another), xz, tar.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
output=${1:-demo-out}
work=$(mktemp -d)
fake_pid=""
cleanup() {
    [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null && wait "$fake_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$python" "$here/fakes/fake_nbia.py" --port 0 --fault-500 0.1 --fault-reset 0.1 --nasty all \
    > "$work/fake.out" 2> "$work/fake.err" &
fake_pid=$!
# The fake prints "READY <url>" once it listens; it may also die first (a missing package).
until grep -q '^READY ' "$work/fake.out"; do
    if ! kill -0 "$fake_pid" 2>/dev/null; then
        echo "demo: the fake NBIA server did not start:" >&2
        cat "$work/fake.err" >&2
        exit 1
    fi
    sleep 0.1
done
url=$(awk '/^READY / {print $2; exit}' "$work/fake.out")
echo "demo: fake NBIA v4 server at $url"

"$python" "$here/../tcia_downloader.py" --collection DEMO --compression --output "$output" \
    --api-url "$url" --retry-wait 0.2

archive="$output/DEMO.tar.xz"
xz -t "$archive"
mkdir "$work/extract"
tar -xJf "$archive" -C "$work/extract"
(cd "$work/extract/DEMO" && md5sum -c --quiet MD5SUMS)
echo "demo: $archive is whole: xz -t, tar -x and md5sum -c pass ($(tar -tJf "$archive" | wc -l) members)"
