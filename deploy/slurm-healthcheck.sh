#!/bin/sh
# Slurm HealthCheckProgram for gpuguard (see docs/DEPLOY.md).
#
# slurmd runs this as root, with no arguments, every HealthCheckInterval
# seconds and kills it after 60 s. Slurm takes no action on its exit code
# (slurmd only logs a non-zero one, as "health_check failed: rc:N output:..."):
# whatever should happen must be done here, so this script drains the node
# when `gpuguardctl check` says it is unhealthy (exit 1) or cannot reach the
# daemon (exit 2). It never resumes a node: gpuguard's [hooks] on_recovered,
# or an operator, does that.
#
# Exit status: 0 when the node is healthy or was drained; scontrol's own when
# the drain failed (127 when there is no scontrol), with its message on stderr.
#
# The node is $SLURMD_NODENAME, which slurmd sets for this program to the
# node's NodeName; run by hand, the short hostname. GPUGUARDCTL and SCONTROL
# name the two commands; gpuguardctl finds the daemon's socket as always
# ($GPUGUARD_SOCKET, else the config's default).
#
# Install: install -m 0755 deploy/slurm-healthcheck.sh /usr/local/sbin/gpuguard-slurm-healthcheck

GPUGUARDCTL=${GPUGUARDCTL:-/usr/local/bin/gpuguardctl}
SCONTROL=${SCONTROL:-scontrol}
NODE=${SLURMD_NODENAME:-$(hostname -s)}

message=$(timeout 30 "$GPUGUARDCTL" check 2>&1)
case $? in
    0) exit 0 ;;
    1) reason=$message ;;
    *) reason="gpuguard unreachable: $message" ;;
esac

# a Slurm reason is one short line
reason=$(printf '%s' "$reason" | tr '\n' ' ' | cut -c 1-200)
exec "$SCONTROL" update NodeName="$NODE" State=DRAIN Reason="$reason"
