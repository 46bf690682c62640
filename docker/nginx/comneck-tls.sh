#!/bin/sh
# nginx's certificate: the cert.pem and key.pem in $PROXY_TLS_DIR when they are there (mount your
# own), else a self-signed one made now for $PROXY_TLS_NAMES (subjectAltName entries) and kept there.
set -eu
dir="${PROXY_TLS_DIR:?PROXY_TLS_DIR names the certificate folder}"
names="${PROXY_TLS_NAMES:-DNS:localhost,IP:127.0.0.1}"
if [ -s "$dir/cert.pem" ] && [ -s "$dir/key.pem" ]; then
    echo "$0: using $dir/cert.pem"
    exit 0
fi
if [ -e "$dir/cert.pem" ] || [ -e "$dir/key.pem" ]; then
    echo "$0: error: $dir holds only one of cert.pem and key.pem (or an empty one); give both" >&2
    exit 1
fi
mkdir -p "$dir"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 -subj "/CN=comneck-proxy" \
    -addext "subjectAltName=$names" -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
chmod 644 "$dir/cert.pem"
echo "$0: made a self-signed certificate for $names in $dir/cert.pem (mount cert.pem and key.pem there to use yours)"
