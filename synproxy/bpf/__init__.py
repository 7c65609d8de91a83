"""The shared BPF layer: the libbpf binding and what both roles' loaders use (loading.py)."""
