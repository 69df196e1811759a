"""The control socket between gpuguardd and gpuguardctl.

`protocol` (the wire form) and `client` are stdlib only; `commands` holds the
command classes and the `Controller` protocol the daemon implements; `server`
is the daemon's socket. Import the module you need: this package imports none
of them, so a client never pulls in the server's dependencies.
"""
