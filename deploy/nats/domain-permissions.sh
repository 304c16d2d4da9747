#!/bin/sh
# Prints deploy/nats/permissions.conf for services whose streams live in a
# JetStream domain (Tocsin's `jetstream.domain`).
#
#   deploy/nats/domain-permissions.sh DOMAIN > /etc/nats/permissions.conf
#
# With a domain, the services ask JetStream's API under $JS.<DOMAIN>.API
# instead of $JS.API, and put the keys of their KV buckets (leases, delivery
# records, remediation state) through it too ($JS.<DOMAIN>.API.$KV.<bucket>.
# <key>, which the server of that domain maps to the bucket). Every other
# subject (tocsin.*, the $JS.ACK replies of their consumers, the inboxes)
# stays as it is. Include the output where the services connect: on the
# leaf node that links them to the domain's servers, say.
#
# DOMAIN is what the NATS servers' `jetstream { domain: ... }` says and
# Tocsin's `jetstream.domain` names: letters, digits, `-` and `_`. Needs
# only a POSIX shell and sed.
set -eu

domain="${1:?usage: $0 DOMAIN   (the jetstream.domain of Tocsin's config)}"
case "$domain" in
  *[!A-Za-z0-9_-]*)
    echo "error: domain '$domain' may hold only letters, digits, '-' and '_'" >&2
    exit 2 ;;
esac
here="$(cd "$(dirname "$0")" && pwd)"
# `$JS.API.` anywhere; `$KV.` only where a quoted subject starts with it
# (a direct get names the key's `$KV.` subject after its own prefix).
sed -e "s/\\\$JS\\.API\\./\$JS.$domain.API./g" \
    -e "s/\"\\\$KV\\./\"\$JS.$domain.API.\$KV./g" \
    "$here/permissions.conf"
