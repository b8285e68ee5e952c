#!/usr/bin/env bash
# A small script for `make demo`: start a web server on loopback, fetch a page
# from it, read a file, and stop the server.
set -eu
dir=$(mktemp -d)
echo "hello from corral" > "$dir/index.html"
python3 -m http.server --bind 127.0.0.1 --directory "$dir" 18765 >/dev/null 2>&1 &
server=$!
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:18765/ && break; sleep 0.1; done
curl -s http://127.0.0.1:18765/index.html
kill "$server"; wait "$server" 2>/dev/null || true
rm -r "$dir"
