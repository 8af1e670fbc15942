#!/bin/sh
# Entrypoint of the ScaleLLM mesh images: runs the given command (a service) as PID 1's child.
#
# Workers must advertise an address the other containers can reach. On a compose network the
# container's hostname (its short id, $HOSTNAME) resolves to it, and it differs per replica, so
# `--scale decode=3` works without fixed names: the workers read SCALELLM_ADVERTISE_HOST (the env
# fallback of --advertise-host) unless it is already set.
set -eu
export SCALELLM_ADVERTISE_HOST="${SCALELLM_ADVERTISE_HOST:-${HOSTNAME:-$(hostname)}}"
exec "$@"
