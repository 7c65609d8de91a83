"""The backend: the tc-BPF program that turns validated ACKs into connections, the XDP stage ahead of it
(established traffic decapsulated before GRO), their loader, and the TIME_WAIT fallback."""
