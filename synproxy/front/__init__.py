"""The front tier: answers SYNs with cookies, validates ACKs, forwards the rest to backends."""
