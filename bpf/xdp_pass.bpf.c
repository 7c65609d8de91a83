// SPDX-License-Identifier: GPL-2.0
/* Passes every frame. Attached to the peer of a veth whose other end runs a native XDP program: in this
 * kernel's veth, frames that program sends back (XDP_TX) reach the peer only when the peer has an XDP
 * program of its own (docs/front.md: all 1000 of 1000 lost without it, none with it). The lab attaches it
 * to the router's side of each front's link; a NIC needs nothing of the kind. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
