/* hp_sockio.h - the system calls of the socket transport's small-frame fast path.
 *
 * Pure C, no Python (the binding is _core.c's SocketFast). A small stdlib frame is a
 * 4-byte big-endian length and the payload; the fast path writes one with a single
 * send or sendmsg and reads one with a read of the header and one of the payload, never past
 * the frame. Each call is one system call and returns its result or -errno.
 */
#ifndef HP_SOCKIO_H
#define HP_SOCKIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Blocking read of at most len bytes (the wait for a frame's header). */
ssize_t hp_sock_read(int fd, void *buf, size_t len);

/* Read of at most len bytes, trying without waiting (MSG_DONTWAIT) and yielding the CPU
 * between tries (a peer runnable on this CPU runs) until something came or `ns` passed:
 * the recv's result, or -EAGAIN when nothing came in time. */
ssize_t hp_sock_read_spin(int fd, void *buf, size_t len, int64_t ns);

/* Read of at most len bytes that never waits (MSG_DONTWAIT): a payload sent with its header. */
ssize_t hp_sock_read_ready(int fd, void *buf, size_t len);

/* Write the frame header for len bytes and the payload with one system call (MSG_NOSIGNAL:
 * a peer that went away is EPIPE, not SIGPIPE); `wait`: blocking, else MSG_DONTWAIT. */
ssize_t hp_sock_send_frame(int fd, const void *payload, uint32_t len, int wait);

/* The big-endian length at the start of a frame. */
int32_t hp_sock_frame_length(const unsigned char head[4]);

#endif
