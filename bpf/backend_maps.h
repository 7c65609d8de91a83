// SPDX-License-Identifier: GPL-2.0
/* The maps the backend's tc program (bpf/backend.bpf.c) and its XDP stage (bpf/backend_xdp.bpf.c) share,
 * defined once: the loader hands the XDP object the tc object's maps (bpf_map__reuse_fd), and libbpf
 * refuses a map whose layout differs. The loader's build cache hashes every header in bpf/, so an edit here
 * rebuilds both objects. */
#ifndef BACKEND_MAPS_H
#define BACKEND_MAPS_H

#include "synproxy.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct backend_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u8[16]); /* IPv4 as ::ffff:a.b.c.d */
	__type(value, __u8);
} trusted_fronts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH); /* see struct encap_keys: updates must be atomic for readers */
	__uint(map_flags, BPF_F_NO_PREALLOC); /* as `salts`: no element reused under a reader */
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct encap_keys);
} encap_keys SEC(".maps");

#endif
