"""gpuguardd: the daemon's process, its main loop and its threads."""
