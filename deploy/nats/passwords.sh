#!/bin/sh
# Makes a password for every NATS user of deploy/nats/permissions.conf.
#
#   deploy/nats/passwords.sh FILE
#
# FILE gets one line per user, TOCSIN_NATS_<USER>_PASSWORD=p<48 hex digits>
# (24 random bytes), the environment file nats-server reads them from
# (e.g. /etc/tocsin/nats-server.env, or .tocsin/nats-passwords.env for
# ./deploy/dev.sh up). It is created with mode 0600; lines already there are
# kept, so running it again only adds users that are new. Needs only a POSIX
# shell, od and /dev/urandom.
set -eu

file="${1:?usage: $0 FILE   (e.g. /etc/tocsin/nats-server.env)}"
here="$(cd "$(dirname "$0")" && pwd)"
names="$(grep -o '\$TOCSIN_NATS_[A-Z0-9_]*_PASSWORD' "$here/permissions.conf" | tr -d '$' | sort -u)"
[ -n "$names" ] || { echo "error: no \$TOCSIN_NATS_*_PASSWORD in $here/permissions.conf" >&2; exit 1; }

umask 077
touch "$file"
chmod 600 "$file"
for name in $names; do
  if ! grep -q "^$name=" "$file"; then
    # nats-server reads a variable as a config value: one made of letters
    # and digits and starting with a letter is a plain string (a leading
    # digit would make it a number, and `#` would start a comment).
    printf '%s=p%s\n' "$name" "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >> "$file"
  fi
done
