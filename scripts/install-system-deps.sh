#!/usr/bin/env bash
# Debian packages the tests and benchmarks talk to, installed only when missing and root.
set -euo pipefail
need=()
for pair in swaks:swaks postfix:postfix smtp-sink:postfix opendkim:opendkim \
            opendkim-testmsg:opendkim-tools knotd:knot kdig:knot-dnsutils; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages (run as root to install): ${need[*]}" >&2
    exit 1
  fi
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  # postfix asks for a mail configuration; "No configuration" keeps it from starting a system MTA.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
