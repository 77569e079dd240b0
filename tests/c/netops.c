/* Traffic generators that need C: io_uring, sendmmsg/recvmmsg, and a process that lives only
 * a few milliseconds. Each prints {"sent": N, "recv": M}: its own exact application bytes.
 *   netops uring HOST PORT SIZE         io_uring send SIZE bytes, then io_uring recv until EOF
 *   netops mmsg HOST PORT COUNT SIZE    sendmmsg COUNT datagrams, recvmmsg COUNT echoes
 *   netops quick HOST PORT SIZE         connect, send SIZE bytes, exit
 *   netops mmsg-send HOST PORT ROUNDS COUNT SIZE
 *                                       ROUNDS sendmmsg calls of COUNT datagrams each, nothing read
 *   netops mmsg-recv HOST PORT COUNT SIZE
 *                                       send "pull COUNT SIZE", recvmmsg until COUNT datagrams
 *                                       arrived or none for a second
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int connect_to(const char *host, int port, int type)
{
	struct sockaddr_storage ss = {0};
	socklen_t len;
	int fd;

	if (strchr(host, ':')) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons(port);
		inet_pton(AF_INET6, host, &a->sin6_addr);
		len = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		a->sin_port = htons(port);
		inet_pton(AF_INET, host, &a->sin_addr);
		len = sizeof(*a);
	}
	fd = socket(ss.ss_family, type, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&ss, len) < 0) {
		perror("connect");
		exit(1);
	}
	return fd;
}

static long uring_op(struct io_uring *ring, int fd, char *buf, size_t len, int send)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
	struct io_uring_cqe *cqe;
	long res;

	if (send)
		io_uring_prep_send(sqe, fd, buf, len, 0);
	else
		io_uring_prep_recv(sqe, fd, buf, len, 0);
	io_uring_submit(ring);
	if (io_uring_wait_cqe(ring, &cqe) < 0)
		exit(1);
	res = cqe->res;
	io_uring_cqe_seen(ring, cqe);
	if (res < 0) {
		fprintf(stderr, "io_uring: %s\n", strerror(-res));
		exit(1);
	}
	return res;
}

static int uring(const char *host, int port, long size)
{
	static char buf[65536];
	struct io_uring ring;
	long sent = 0, recv = 0, n;
	int fd = connect_to(host, port, SOCK_STREAM);

	if (io_uring_queue_init(8, &ring, 0) < 0)
		return 1;
	memset(buf, 'i', sizeof(buf));
	while (sent < size)
		sent += uring_op(&ring, fd, buf, size - sent < (long)sizeof(buf) ? size - sent : sizeof(buf), 1);
	shutdown(fd, SHUT_WR);
	while ((n = uring_op(&ring, fd, buf, sizeof(buf), 0)) > 0)
		recv += n;
	printf("{\"sent\": %ld, \"recv\": %ld}\n", sent, recv);
	return 0;
}

static int mmsg(const char *host, int port, int count, int size)
{
	struct mmsghdr msgs[64];
	struct iovec iov[64];
	static char bufs[64][2048];
	long sent = 0, recv = 0;
	int fd = connect_to(host, port, SOCK_DGRAM), n, got = 0;

	if (count > 64 || size > 2048)
		return 1;
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < count; i++) {
		memset(bufs[i], 'm', size);
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = size;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	n = sendmmsg(fd, msgs, count, 0);
	for (int i = 0; i < n; i++)
		sent += msgs[i].msg_len;
	for (int i = 0; i < count; i++)
		iov[i].iov_len = sizeof(bufs[i]);
	while (got < count) {
		n = recvmmsg(fd, msgs, count - got, MSG_WAITFORONE, NULL);
		if (n <= 0)
			break;
		for (int i = 0; i < n; i++)
			recv += msgs[i].msg_len;
		got += n;
	}
	printf("{\"sent\": %ld, \"recv\": %ld}\n", sent, recv);
	return 0;
}

static int quick(const char *host, int port, long size)
{
	static char buf[65536];
	int fd = connect_to(host, port, SOCK_STREAM);
	long n = write(fd, buf, size < (long)sizeof(buf) ? size : (long)sizeof(buf));

	printf("{\"sent\": %ld, \"recv\": 0}\n", n);
	return 0;
}

static int mmsg_send(const char *host, int port, long rounds, int count, int size)
{
	struct mmsghdr msgs[64];
	struct iovec iov[64];
	static char buf[2048];
	long sent = 0;
	int fd = connect_to(host, port, SOCK_DGRAM);

	if (count > 64 || size > 2048)
		return 1;
	memset(msgs, 0, sizeof(msgs));
	memset(buf, 'M', sizeof(buf));
	for (int i = 0; i < count; i++) {
		iov[i].iov_base = buf;
		iov[i].iov_len = size;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	for (long r = 0; r < rounds; r++) {
		int done = 0;
		while (done < count) {
			int n = sendmmsg(fd, msgs + done, count - done, 0);
			if (n < 0) {
				perror("sendmmsg");
				return 1;
			}
			for (int i = done; i < done + n; i++)
				sent += msgs[i].msg_len;
			done += n;
		}
	}
	printf("{\"sent\": %ld, \"recv\": 0}\n", sent);
	return 0;
}

static int mmsg_recv(const char *host, int port, long count, int size)
{
	struct mmsghdr msgs[64];
	struct iovec iov[64];
	static char bufs[64][2048];
	struct timeval tv = {1, 0};
	char request[64];
	long sent, recv = 0, got = 0;
	int fd = connect_to(host, port, SOCK_DGRAM), n;

	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < 64; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = sizeof(bufs[i]);
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	snprintf(request, sizeof(request), "pull %ld %d", count, size);
	sent = send(fd, request, strlen(request), 0);
	while (got < count) {
		n = recvmmsg(fd, msgs, count - got < 64 ? count - got : 64, MSG_WAITFORONE, NULL);
		if (n <= 0)
			break;
		for (int i = 0; i < n; i++)
			recv += msgs[i].msg_len;
		got += n;
	}
	printf("{\"sent\": %ld, \"recv\": %ld, \"datagrams\": %ld}\n", sent, recv, got);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "uring"))
		return uring(argv[2], atoi(argv[3]), atol(argv[4]));
	if (argc >= 6 && !strcmp(argv[1], "mmsg"))
		return mmsg(argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
	if (argc >= 5 && !strcmp(argv[1], "quick"))
		return quick(argv[2], atoi(argv[3]), atol(argv[4]));
	if (argc >= 7 && !strcmp(argv[1], "mmsg-send"))
		return mmsg_send(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]), atoi(argv[6]));
	if (argc >= 6 && !strcmp(argv[1], "mmsg-recv"))
		return mmsg_recv(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]));
	fprintf(stderr, "usage: netops uring|mmsg|quick|mmsg-send|mmsg-recv HOST PORT ...\n");
	return 2;
}
