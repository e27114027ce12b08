#!/usr/bin/env bash
# Test certificates made with the openssl command: a CA named NAME and two
# certificates it signed, in DIR:
#   NAME-ca.pem (and .key)             the CA, self-signed
#   NAME-server.pem, NAME-server.key   CN localhost, SANs localhost and 127.0.0.1
#   NAME-client.pem, NAME-client.key   CN client, for mutual TLS
# EC P-256 keys, valid DAYS (30) days from now.
#   make_certs.sh DIR NAME [DAYS]
set -euo pipefail
cd "$1"
n=$2
days=${3:-30}
# req OUT CN [openssl req options...]: a new key OUT.key and a request or certificate.
req() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" -keyout "$1.key" "${@:3}" 2>/dev/null; }
# sign OUT [openssl x509 options...]: OUT.pem from OUT.csr, signed by the CA.
sign() { openssl x509 -req -in "$1.csr" -CA "$n-ca.pem" -CAkey "$n-ca.key" -CAcreateserial -days "$days" -out "$1.pem" "${@:2}" 2>/dev/null; }
req "$n-ca" "$n-test-ca" -x509 -days "$days" -out "$n-ca.pem"
req "$n-server" localhost -out "$n-server.csr"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$n-san"
sign "$n-server" -extfile "$n-san"
req "$n-client" client -out "$n-client.csr"
sign "$n-client"
