"""Side effects on GPUs and the node: reset, node hooks. Kept at the edge."""
