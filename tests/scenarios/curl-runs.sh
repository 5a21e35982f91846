# curl-runs: Debian's arm64 curl (and the libraries it loads, from the curl archive the
# rig unpacks into /curl) runs in the rig through its own loader, and speaks HTTP/1.1
# over a unix socket, as the fc-api scenario drives hvrun's API socket with it. The
# server here is `vsock-peer uds-listen`, which answers with the canned response it reads
# from its standard input and writes what it received to a file. No guest boots.
set -o pipefail
curl --version | sed 's/^/curl-runs: /'
echo "curl-runs: curl --version exit $?"
rm -f /tmp/curl-probe.sock /tmp/curl-probe.ready
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\nConnection: close\r\n\r\n{"probe":"ok"}\n' \
    | vsock-peer uds-listen /tmp/curl-probe.sock --ready /tmp/curl-probe.ready >/tmp/curl-probe.req &
server=$!
n=0
until [ -e /tmp/curl-probe.ready ] || [ $n -ge 100 ]; do sleep 0.1; n=$((n + 1)); done
code=$(curl -s --unix-socket /tmp/curl-probe.sock -o /tmp/curl-probe.body -w '%{http_code}' \
    -X PUT 'http://localhost/probe' -H 'Accept: application/json' -H 'Content-Type: application/json' \
    -d '{"probe":1}')
echo "curl-runs: PUT /probe -> $code $(cat /tmp/curl-probe.body 2>/dev/null)"
# The server ends once curl has closed the connection; a hang is cut short.
(sleep 20; kill $server 2>/dev/null) &
dog=$!
wait $server
kill $dog 2>/dev/null
echo "curl-runs: the server got: $(head -n 1 /tmp/curl-probe.req | tr -d '\r')"
grep -q '^{"probe":1}$' /tmp/curl-probe.req && echo 'curl-runs: the request body arrived whole'
rm -f /tmp/curl-probe.sock /tmp/curl-probe.ready /tmp/curl-probe.req /tmp/curl-probe.body
