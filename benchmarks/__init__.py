"""`synproxy bench`: the front against the kernel's SYN cookies and iptables SYNPROXY (see README.md)."""
