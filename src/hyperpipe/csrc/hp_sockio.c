/* hp_sockio.c - see hp_sockio.h. */
#include "hp_sockio.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

ssize_t hp_sock_read(int fd, void *buf, size_t len) {
    ssize_t n = read(fd, buf, len);
    return n < 0 ? -errno : n;
}

ssize_t hp_sock_read_ready(int fd, void *buf, size_t len) {
    ssize_t n = recv(fd, buf, len, MSG_DONTWAIT);
    return n < 0 ? -errno : n;
}

ssize_t hp_sock_send_frame(int fd, const void *payload, uint32_t len) {
    uint32_t head = htonl(len);
    struct iovec iov[2] = {{&head, sizeof head}, {(void *)payload, len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
    ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    return n < 0 ? -errno : n;
}

int32_t hp_sock_frame_length(const unsigned char head[4]) {
    uint32_t raw;
    memcpy(&raw, head, sizeof raw);
    return (int32_t)ntohl(raw);
}
