"""Real outside services on loopback (Slurm, munge, an S3 server) for the cluster
tests, `make demo-cluster` and the storage benchmarks; never shipped (only gpuguard*
is packaged)."""
