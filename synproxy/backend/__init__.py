"""The backend: the tc-BPF program that turns validated ACKs into connections, and its loader."""
