"""libc calls made from inside compiled loops (one read()/write() per packet, no Python).

Declared as numba external functions, so kernels that use them stay cacheable
and NRT-free. Buffers are passed as addresses (``arr.ctypes.data + offset``);
every caller checks offset and length against the array first.
"""
from __future__ import annotations

from numba import types

read = types.ExternalFunction("read", types.intp(types.int32, types.voidptr, types.uintp))
write = types.ExternalFunction("write", types.intp(types.int32, types.voidptr, types.uintp))
# send(fd, NULL, 0, MSG_DONTWAIT) kicks an AF_PACKET transmit ring.
send = types.ExternalFunction("send", types.intp(types.int32, types.voidptr, types.uintp,
                                                 types.int32))
# writev(fd, iov, iovcnt): a header and a frame in one call without copying the frame;
# ``iov`` is the address of an int64 array of (base, length) pairs (struct iovec).
writev = types.ExternalFunction("writev", types.intp(types.int32, types.voidptr, types.int32))
# clock_gettime(clockid, struct timespec *) and clock_nanosleep(clockid, flags, request,
# remain): ``ts`` is the address of an int64 array of (seconds, nanoseconds).
clock_gettime = types.ExternalFunction("clock_gettime", types.int32(types.int32, types.voidptr))
clock_nanosleep = types.ExternalFunction("clock_nanosleep", types.int32(
    types.int32, types.int32, types.voidptr, types.voidptr))
# poll(struct pollfd *, nfds, timeout): ``fds`` is the address of an int32 array of
# (fd, events | revents << 16) pairs (struct pollfd on a little-endian machine).
poll = types.ExternalFunction("poll", types.int32(types.voidptr, types.uint64, types.int32))
