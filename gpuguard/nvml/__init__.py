"""The NVML boundary: the only package that imports pynvml.

Everything above it sees plain frozen snapshots (`types.py`) through the
`Backend` protocol (`backend.py`), so it is testable without a GPU.
"""
