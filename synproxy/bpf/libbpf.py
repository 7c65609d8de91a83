"""A thin ctypes shell over libbpf (Debian's libbpf1 1.1): objects, maps, tc attach, test runs, BTF.

Only what the programs' loaders need. Every failure becomes :class:`BpfError` (an OSError with the errno's
text), never a crash. Struct layouts are those of /usr/include/bpf/libbpf.h and bpf.h (checked by size).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from pathlib import Path

from synproxy.logs import log

BPF_TC_INGRESS = 1
BPF_TC_F_REPLACE = 1
BPF_ANY = 0
# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
BTF_KIND_FUNC = 12
# Map types whose lookups return one value per possible CPU (linux/bpf.h enum bpf_map_type).
PER_CPU_MAP_TYPES = {5, 6, 10, 21}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE


class BpfError(OSError):
    pass


def _load_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise BpfError(errno.ENOENT, "libbpf not found: install the libbpf1 package") from None


_lib = _load_library()
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF = 321 if os.uname().machine == "x86_64" else 280  # x86-64 or the generic table (arm64)
_BPF_ENABLE_STATS = 32
_voidp = ctypes.c_void_p
_u32 = ctypes.c_uint32


def _declare(name: str, restype, *argtypes) -> None:
    function = getattr(_lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)


_declare("bpf_object__open_file", _voidp, ctypes.c_char_p, _voidp)
_declare("bpf_object__load", ctypes.c_int, _voidp)
_declare("bpf_object__close", None, _voidp)
_declare("bpf_object__find_program_by_name", _voidp, _voidp, ctypes.c_char_p)
_declare("bpf_object__find_map_by_name", _voidp, _voidp, ctypes.c_char_p)
_declare("bpf_program__fd", ctypes.c_int, _voidp)
_declare("bpf_object__next_program", _voidp, _voidp, _voidp)
_declare("bpf_program__name", ctypes.c_char_p, _voidp)
_declare("bpf_program__set_log_level", ctypes.c_int, _voidp, _u32)
_declare("bpf_program__set_log_buf", ctypes.c_int, _voidp, _voidp, ctypes.c_size_t)
_declare("bpf_object__next_map", _voidp, _voidp, _voidp)
_declare("bpf_map__name", ctypes.c_char_p, _voidp)
_declare("bpf_map__fd", ctypes.c_int, _voidp)
_declare("bpf_map__type", ctypes.c_int, _voidp)
_declare("bpf_map__key_size", _u32, _voidp)
_declare("bpf_map__value_size", _u32, _voidp)
_declare("bpf_map__max_entries", _u32, _voidp)
_declare("bpf_map__reuse_fd", ctypes.c_int, _voidp, ctypes.c_int)
_declare("bpf_map_update_elem", ctypes.c_int, ctypes.c_int, _voidp, _voidp, ctypes.c_uint64)
_declare("bpf_map_lookup_elem", ctypes.c_int, ctypes.c_int, _voidp, _voidp)
_declare("bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, _voidp)
_declare("bpf_map_get_next_key", ctypes.c_int, ctypes.c_int, _voidp, _voidp)
_declare("bpf_tc_hook_create", ctypes.c_int, _voidp)
_declare("bpf_tc_attach", ctypes.c_int, _voidp, _voidp)
_declare("bpf_tc_detach", ctypes.c_int, _voidp, _voidp)
_declare("bpf_tc_query", ctypes.c_int, _voidp, _voidp)
_declare("bpf_xdp_attach", ctypes.c_int, ctypes.c_int, ctypes.c_int, _u32, _voidp)
_declare("bpf_xdp_detach", ctypes.c_int, ctypes.c_int, _u32, _voidp)
_declare("bpf_xdp_query", ctypes.c_int, ctypes.c_int, ctypes.c_int, _voidp)
_declare("bpf_prog_test_run_opts", ctypes.c_int, ctypes.c_int, _voidp)
_declare("bpf_prog_get_fd_by_id", ctypes.c_int, _u32)
_declare("bpf_map_get_fd_by_id", ctypes.c_int, _u32)
_declare("bpf_obj_get_info_by_fd", ctypes.c_int, ctypes.c_int, _voidp, ctypes.POINTER(_u32))
_declare("btf__load_vmlinux_btf", _voidp)
_declare("btf__find_by_name_kind", ctypes.c_int, _voidp, ctypes.c_char_p, _u32)
_declare("btf__free", None, _voidp)
_RING_SAMPLE = ctypes.CFUNCTYPE(ctypes.c_int, _voidp, _voidp, ctypes.c_size_t)
_declare("ring_buffer__new", _voidp, ctypes.c_int, _RING_SAMPLE, _voidp, _voidp)
_declare("ring_buffer__poll", ctypes.c_int, _voidp, ctypes.c_int)
_declare("ring_buffer__free", None, _voidp)

_PRINT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_libc = ctypes.CDLL(None)
_libc.vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
_libc.vsnprintf.restype = ctypes.c_int
_declare("libbpf_set_print", _voidp, _PRINT)
_LIBBPF_EVENTS = ("libbpf_warning", "libbpf_info")  # enum libbpf_print_level: WARN, INFO (DEBUG is not shown)
_MESSAGE_REPEAT_SECONDS = 60.0
_logged: dict[str, float] = {}  # message -> when it was last logged (monotonic)


@_PRINT
def _on_print(level: int, fmt: bytes, args: int | None) -> int:
    if level >= len(_LIBBPF_EVENTS):
        return 0
    text = ctypes.create_string_buffer(1 << 16)
    _libc.vsnprintf(text, len(text), fmt, args)
    message = text.value.decode(errors="replace").strip()
    now = time.monotonic()
    if now - _logged.get(message, -_MESSAGE_REPEAT_SECONDS) >= _MESSAGE_REPEAT_SECONDS:
        if len(_logged) > 1000:  # distinct messages (load logs) must not grow it for ever
            _logged.clear()
        _logged[message] = now
        log(_LIBBPF_EVENTS[level], message=message)
    return 0


def log_messages() -> None:
    """Make libbpf's messages log events, for a node (the CLI's front and backend).

    libbpf prints its warnings (a netlink request's extended ack, a load's log) to stderr itself: raw lines
    in a node's JSON log, and, for a query the loop repeats, at every beat (a backend whose clsact qdisc was
    removed printed "Kernel error message: Parent Qdisc doesn't exists" four times a second). Each distinct
    message becomes one `libbpf_warning` (or `libbpf_info`) event instead, repeated at most once a minute.
    """
    _lib.libbpf_set_print(_on_print)


def _check(result: int, what: str) -> int:
    """libbpf 1.x returns -errno (and sets errno); turn a failure into an exception."""
    if result < 0:
        code = -result if result != -1 else (ctypes.get_errno() or errno.EINVAL)
        raise BpfError(code, f"{what}: {os.strerror(code)}")
    return result


class TcHook(ctypes.Structure):  # struct bpf_tc_hook
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_int),
                ("parent", _u32), ("_pad", _u32)]


class TcOpts(ctypes.Structure):  # struct bpf_tc_opts
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", _u32), ("prog_id", _u32),
                ("handle", _u32), ("priority", _u32), ("_pad", _u32)]


class _TestRunOpts(ctypes.Structure):  # struct bpf_test_run_opts
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", _voidp), ("data_out", _voidp),
                ("data_size_in", _u32), ("data_size_out", _u32), ("ctx_in", _voidp), ("ctx_out", _voidp),
                ("ctx_size_in", _u32), ("ctx_size_out", _u32), ("retval", _u32), ("repeat", ctypes.c_int),
                ("duration", _u32), ("flags", _u32), ("cpu", _u32), ("batch_size", _u32)]


class _XdpAttachOpts(ctypes.Structure):  # struct bpf_xdp_attach_opts
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int), ("_pad", ctypes.c_int)]


class _XdpQueryOpts(ctypes.Structure):  # struct bpf_xdp_query_opts (libbpf 1.1)
    _fields_ = [("sz", ctypes.c_size_t), ("prog_id", _u32), ("drv_prog_id", _u32), ("hw_prog_id", _u32),
                ("skb_prog_id", _u32), ("attach_mode", ctypes.c_uint8)]


assert ctypes.sizeof(_XdpAttachOpts) == 16 and ctypes.sizeof(_XdpQueryOpts) == 32
assert ctypes.sizeof(TcHook) == 24 and ctypes.sizeof(TcOpts) == 32 and ctypes.sizeof(_TestRunOpts) == 80


def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU (not per online CPU)."""
    count = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


class Map:
    """A map by file descriptor, with its key and value sizes."""

    def __init__(self, fd: int, key_size: int, value_size: int, per_cpu: bool = False, max_entries: int = 0):
        self.fd, self.key_size, self.value_size, self.per_cpu = fd, key_size, value_size, per_cpu
        self.max_entries = max_entries

    def update(self, key: bytes, value: bytes) -> None:
        """Set an element; in a per-CPU map, every CPU's copy to ``value``."""
        if len(key) != self.key_size or len(value) != self.value_size:
            raise BpfError(errno.EINVAL, f"map entry of {len(key)}+{len(value)} bytes, "
                                         f"expected {self.key_size}+{self.value_size}")
        if self.per_cpu:  # the kernel reads one value per possible CPU, each 8-byte aligned
            value = value.ljust((self.value_size + 7) // 8 * 8, b"\0") * possible_cpus()
        _check(_lib.bpf_map_update_elem(self.fd, key, value, BPF_ANY), "bpf_map_update_elem")

    def delete(self, key: bytes) -> None:
        result = _lib.bpf_map_delete_elem(self.fd, key)
        if result < 0 and -result != errno.ENOENT:
            _check(result, "bpf_map_delete_elem")

    def keys(self) -> list[bytes]:
        found, previous = [], None
        current = ctypes.create_string_buffer(self.key_size)
        while _lib.bpf_map_get_next_key(self.fd, previous, current) == 0:
            found.append(current.raw)
            previous = ctypes.create_string_buffer(current.raw, self.key_size)
        return found

    def lookup(self, key: bytes) -> list[bytes] | bytes | None:
        """The value, or for a per-CPU map one value per possible CPU (each stored 8-byte aligned)."""
        stride = (self.value_size + 7) // 8 * 8
        size = stride * possible_cpus() if self.per_cpu else self.value_size
        buffer = ctypes.create_string_buffer(size)
        result = _lib.bpf_map_lookup_elem(self.fd, key, buffer)
        if result < 0:
            if -result == errno.ENOENT:
                return None
            _check(result, "bpf_map_lookup_elem")
        if self.per_cpu:
            return [buffer.raw[i:i + self.value_size] for i in range(0, size, stride)]
        return buffer.raw


class RingBuffer:
    """A BPF_MAP_TYPE_RINGBUF map read through libbpf: poll() hands each record's bytes to ``on_record``
    (in the polling thread; an exception there is the callback's to catch: ctypes would only print it)."""

    def __init__(self, ring_map: Map, on_record):
        def sample(_context, data, size) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        self._callback = _RING_SAMPLE(sample)  # kept: libbpf holds only the pointer
        self._ring = _lib.ring_buffer__new(ring_map.fd, self._callback, None, None)
        if not self._ring:
            code = ctypes.get_errno() or errno.EINVAL
            raise BpfError(code, f"ring_buffer__new: {os.strerror(code)}")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for records and hand them over; how many (a signal counts as none)."""
        result = _lib.ring_buffer__poll(self._ring, timeout_ms)
        return 0 if result == -errno.EINTR else _check(result, "ring_buffer__poll")

    def close(self) -> None:
        if self._ring:
            _lib.ring_buffer__free(self._ring)
            self._ring = None


class BpfObject:
    """A loaded BPF object file; closing it releases what no attachment still holds."""

    def __init__(self, path: Path, shared: dict[str, Map] | None = None):
        """``shared``: maps of another loaded object this one uses instead of its own maps of those names
        (bpf_map__reuse_fd; libbpf refuses a map whose type, sizes or flags differ)."""
        self._obj = _lib.bpf_object__open_file(str(path).encode(), None)
        if not self._obj:
            code = ctypes.get_errno() or errno.EINVAL
            raise BpfError(code, f"cannot open BPF object {path}: {os.strerror(code)}")
        for name, existing in (shared or {}).items():
            found = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
            result = _lib.bpf_map__reuse_fd(found, existing.fd) if found else -errno.ENOENT
            if result:
                self.close()
                _check(result if result < 0 else -errno.EINVAL, f"sharing map {name!r} with {path.name}")
        result = _lib.bpf_object__load(self._obj)
        if result:
            _lib.bpf_object__close(self._obj)
            self._obj = None
            _check(result if result < 0 else -errno.EINVAL, f"loading {path.name} (libbpf's log is above)")

    def program_fd(self, name: str) -> int:
        program = _lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if not program:
            raise BpfError(errno.ENOENT, f"no program {name!r} in the object")
        return _lib.bpf_program__fd(program)

    def map(self, name: str) -> Map:
        found = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not found:
            raise BpfError(errno.ENOENT, f"no map {name!r} in the object")
        return Map(_lib.bpf_map__fd(found), _lib.bpf_map__key_size(found), _lib.bpf_map__value_size(found),
                   per_cpu=_lib.bpf_map__type(found) in PER_CPU_MAP_TYPES,
                   max_entries=_lib.bpf_map__max_entries(found))

    def program_fds(self) -> dict[str, int]:
        """Every program of the object, by name."""
        fds, program = {}, _lib.bpf_object__next_program(self._obj, None)
        while program:
            fds[_lib.bpf_program__name(program).decode()] = _lib.bpf_program__fd(program)
            program = _lib.bpf_object__next_program(self._obj, program)
        return fds

    def map_names(self) -> list[str]:
        """Every map the object created, its .rodata and .bss ones included, by libbpf's name."""
        names, found = [], _lib.bpf_object__next_map(self._obj, None)
        while found:
            names.append(_lib.bpf_map__name(found).decode())
            found = _lib.bpf_object__next_map(self._obj, found)
        return names

    def close(self) -> None:
        if self._obj:
            _lib.bpf_object__close(self._obj)
            self._obj = None


_BPF_LOG_STATS = 4  # the verifier's summary only (and its error, when it refuses)


def verifier_logs(path: Path, log_size: int = 1 << 20) -> tuple[int, dict[str, str]]:
    """Load an object's programs with the verifier's statistics logged (instructions processed, each BPF
    function's stack depth) and close it again: libbpf's load result (0, or -errno when the verifier
    refused one) and each program's log, which ends with the verifier's reason when it refused."""
    obj = _lib.bpf_object__open_file(str(path).encode(), None)
    if not obj:
        code = ctypes.get_errno() or errno.EINVAL
        raise BpfError(code, f"cannot open BPF object {path}: {os.strerror(code)}")
    buffers = {}
    try:
        program = _lib.bpf_object__next_program(obj, None)
        while program:
            name = _lib.bpf_program__name(program).decode()
            buffers[name] = ctypes.create_string_buffer(log_size)
            _lib.bpf_program__set_log_buf(program, buffers[name], log_size)
            _lib.bpf_program__set_log_level(program, _BPF_LOG_STATS)
            program = _lib.bpf_object__next_program(obj, program)
        result = _lib.bpf_object__load(obj)
    finally:
        _lib.bpf_object__close(obj)
    return result, {name: buffer.value.decode(errors="replace") for name, buffer in buffers.items()}


def kernel_has_function(name: str) -> bool:
    """Is ``name`` a function in the running kernel's BTF (how libbpf resolves a kfunc)?"""
    btf = _lib.btf__load_vmlinux_btf()
    if not btf:
        code = ctypes.get_errno() or errno.ENOENT
        raise BpfError(code, f"cannot read the kernel's BTF: {os.strerror(code)}")
    try:
        return _lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_FUNC) > 0
    finally:
        _lib.btf__free(btf)


def _hook(ifindex: int) -> TcHook:
    return TcHook(sz=ctypes.sizeof(TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS)


def tc_attach(ifindex: int, prog_fd: int, handle: int, priority: int) -> None:
    """Attach to tc ingress (creating clsact if needed), replacing our own earlier filter."""
    result = _lib.bpf_tc_hook_create(ctypes.byref(_hook(ifindex)))
    if result < 0 and -result != errno.EEXIST:
        _check(result, "bpf_tc_hook_create")
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), prog_fd=prog_fd, flags=BPF_TC_F_REPLACE, handle=handle,
                  priority=priority)
    _check(_lib.bpf_tc_attach(ctypes.byref(_hook(ifindex)), ctypes.byref(opts)), "bpf_tc_attach")


def tc_attached_program(ifindex: int, handle: int, priority: int) -> int | None:
    """The id of the program in our filter slot, or None."""
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), handle=handle, priority=priority)
    result = _lib.bpf_tc_query(ctypes.byref(_hook(ifindex)), ctypes.byref(opts))
    if result < 0:
        if -result in (errno.ENOENT, errno.EINVAL):
            return None
        _check(result, "bpf_tc_query")
    return opts.prog_id


def tc_detach(ifindex: int, handle: int, priority: int) -> bool:
    """Remove our filter; False when there was none."""
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), handle=handle, priority=priority)
    result = _lib.bpf_tc_detach(ctypes.byref(_hook(ifindex)), ctypes.byref(opts))
    if result < 0 and -result in (errno.ENOENT, errno.EINVAL):
        return False
    _check(result, "bpf_tc_detach")
    return True


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    """Attach an XDP program; ``flags`` choose the mode (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE) and
    XDP_FLAGS_UPDATE_IF_NOEXIST refuses (EBUSY) to replace another program."""
    _check(_lib.bpf_xdp_attach(ifindex, prog_fd, flags, None), "bpf_xdp_attach")


def xdp_detach(ifindex: int, mode: int, prog_fd: int) -> bool:
    """Detach ``prog_fd`` attached in ``mode``, and only it (XDP_FLAGS_REPLACE: a program someone else
    attached since stays); False when it was not there."""
    opts = _XdpAttachOpts(sz=ctypes.sizeof(_XdpAttachOpts), old_prog_fd=prog_fd)
    result = _lib.bpf_xdp_detach(ifindex, mode | XDP_FLAGS_REPLACE, ctypes.byref(opts))
    if result < 0 and -result in (errno.ENOENT, errno.EEXIST, errno.ENODEV):
        return False
    _check(result, "bpf_xdp_detach")
    return True


def xdp_attached_program(ifindex: int) -> tuple[int, int] | None:
    """The id of the XDP program attached to the interface and its mode's flag (XDP_FLAGS_DRV_MODE or
    XDP_FLAGS_SKB_MODE), or None."""
    opts = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
    _check(_lib.bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), "bpf_xdp_query")
    if opts.drv_prog_id:
        return opts.drv_prog_id, XDP_FLAGS_DRV_MODE
    if opts.skb_prog_id:
        return opts.skb_prog_id, XDP_FLAGS_SKB_MODE
    return None


# struct bpf_prog_info / bpf_map_info (linux/bpf.h): only the leading fields read here.
class _ProgInfo(ctypes.Structure):
    _fields_ = [("type", _u32), ("id", _u32), ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", _u32),
                ("xlated_prog_len", _u32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", _u32), ("nr_map_ids", _u32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16)]


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", _u32), ("id", _u32), ("key_size", _u32), ("value_size", _u32),
                ("max_entries", _u32), ("map_flags", _u32), ("name", ctypes.c_char * 16)]


def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    length = _u32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(length)), what)


def program_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (what bpftool and `ip link` show)."""
    info = _ProgInfo()
    _info(prog_fd, info, "program info")
    return info.id


def xdp_detach_id(ifindex: int, mode: int, prog_id: int) -> bool:
    """xdp_detach for a program known by its id (one a process that died left attached)."""
    prog_fd = _check(_lib.bpf_prog_get_fd_by_id(prog_id), "bpf_prog_get_fd_by_id")
    try:
        return xdp_detach(ifindex, mode, prog_fd)
    finally:
        os.close(prog_fd)


def program_name(prog_id: int) -> str:
    """A loaded program's name as the kernel keeps it: its first 15 characters."""
    prog_fd = _check(_lib.bpf_prog_get_fd_by_id(prog_id), "bpf_prog_get_fd_by_id")
    try:
        info = _ProgInfo()
        _info(prog_fd, info, "program info")
    finally:
        os.close(prog_fd)
    return info.name.decode()


def enable_run_time_stats() -> int:
    """Have the kernel count every program's run time and runs (run_time_ns, run_cnt) until the returned
    descriptor is closed: BPF_ENABLE_STATS, which, unlike the kernel.bpf_stats_enabled sysctl, others
    measuring at the same time cannot switch off under us."""
    attr = ctypes.create_string_buffer(8)  # union bpf_attr's enable_stats: type = BPF_STATS_RUN_TIME (0)
    fd = _libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, attr, len(attr))
    if fd < 0:
        code = ctypes.get_errno()
        raise BpfError(code, f"BPF_ENABLE_STATS: {os.strerror(code)}")
    return fd


def program_maps(prog_id: int) -> dict[str, Map]:
    """The maps of a loaded program by name, found through its id.

    Works from any process and mount namespace; pinned paths would not survive `ip netns exec`, which
    mounts a fresh /sys (and so a fresh, empty bpffs) for every command it runs.
    """
    prog_fd = _check(_lib.bpf_prog_get_fd_by_id(prog_id), "bpf_prog_get_fd_by_id")
    try:
        info = _ProgInfo()
        _info(prog_fd, info, "program info")
        ids = (_u32 * info.nr_map_ids)()
        _info(prog_fd, _ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids)), "program info")
    finally:
        os.close(prog_fd)
    maps = {}
    for map_id in ids:
        fd = _check(_lib.bpf_map_get_fd_by_id(map_id), "bpf_map_get_fd_by_id")
        map_info = _MapInfo()
        _info(fd, map_info, "map info")
        maps[map_info.name.decode()] = Map(fd, map_info.key_size, map_info.value_size,
                                           per_cpu=map_info.type in PER_CPU_MAP_TYPES,
                                           max_entries=map_info.max_entries)
    return maps


def prog_test_run(prog_fd: int, packet: bytes, out_size: int = 2048, context: bytes | None = None,
                  repeat: int = 1) -> tuple[int, bytes]:
    """Run the program on ``packet`` (BPF_PROG_TEST_RUN): its return code and the packet after.

    ``context`` is the program's context (an XDP program's struct xdp_md: its ingress_ifindex says
    which interface the frame came in on; the loopback otherwise); ``repeat`` runs it that many times.
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(out_size)
    context_in = ctypes.create_string_buffer(context, len(context)) if context else None
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(data_in),
                        data_out=ctypes.addressof(data_out), data_size_in=len(packet), data_size_out=out_size,
                        ctx_in=ctypes.addressof(context_in) if context else None,
                        ctx_size_in=len(context) if context else 0, repeat=repeat)
    _check(_lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    return opts.retval, data_out.raw[:opts.data_size_out]
