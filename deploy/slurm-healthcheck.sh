#!/bin/sh
# Slurm HealthCheckProgram for gpuguard (see docs/DEPLOY.md).
#
# slurmd runs this as root, with no arguments, every HealthCheckInterval
# seconds and kills it after 60 s. Slurm does nothing with the exit code:
# whatever should happen must be done here, so this script drains the node
# when `gpuguardctl check` says it is unhealthy (exit 1) or cannot reach the
# daemon (exit 2). It never resumes a node: gpuguard's [hooks] on_recovered,
# or an operator, does that.
#
# Install: install -m 0755 deploy/slurm-healthcheck.sh /usr/local/sbin/gpuguard-slurm-healthcheck

GPUGUARDCTL=${GPUGUARDCTL:-/usr/local/bin/gpuguardctl}
SCONTROL=${SCONTROL:-scontrol}
# the node's NodeName in slurm.conf; change this if it is not the short hostname
NODE=$(hostname -s)

message=$(timeout 30 "$GPUGUARDCTL" check 2>&1)
case $? in
    0) exit 0 ;;
    1) reason=$message ;;
    *) reason="gpuguard unreachable: $message" ;;
esac

# a Slurm reason is one short line
reason=$(printf '%s' "$reason" | tr '\n' ' ' | cut -c 1-200)
exec "$SCONTROL" update NodeName="$NODE" State=DRAIN Reason="$reason"
