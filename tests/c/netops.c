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
 *   netops named HOST PORT SIZE NAME    connect, send an HTTP request whose Host is NAME, then SIZE
 *                                       bytes, read until EOF (the alert tests: a domain by Host)
 *   netops serve PORT COUNT             listen on PORT (IPv4 and IPv6; 0: any), print "ready PORT",
 *                                       read COUNT connections until EOF, exit
 *   netops udp-threads HOST THREADS COUNT PORT...
 *                                       threads sharing one unconnected UDP socket (see udp_threads);
 *                                       also prints "peers": {PORT: [sent, recv]}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <liburing.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

/* The socket address of HOST (IPv4 or IPv6 literal) and PORT; returns its length. */
static socklen_t address_of(const char *host, int port, struct sockaddr_storage *out)
{
	struct sockaddr_storage ss = {0};
	socklen_t len;

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
	*out = ss;
	return len;
}

static int connect_to(const char *host, int port, int type)
{
	struct sockaddr_storage ss;
	socklen_t len = address_of(host, port, &ss);
	int fd = socket(ss.ss_family, type, 0);

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

static void send_all(int fd, const char *data, size_t len)
{
	while (len) {
		ssize_t n = send(fd, data, len, 0);
		if (n <= 0) {
			perror("send");
			exit(1);
		}
		data += n;
		len -= n;
	}
}

static long drain(int fd)
{
	static char buf[65536];
	long got = 0, n;
	while ((n = recv(fd, buf, sizeof(buf), 0)) > 0)
		got += n;
	return got;
}

static int named(const char *host, int port, long size, const char *name)
{
	static char block[65536];
	char request[512];
	int fd = connect_to(host, port, SOCK_STREAM);
	int n = snprintf(request, sizeof(request), "GET / HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n", name);
	long sent = n;

	send_all(fd, request, n);
	memset(block, 'a', sizeof(block));
	for (long left = size; left > 0; left -= sizeof(block))
		send_all(fd, block, left < (long)sizeof(block) ? (size_t)left : sizeof(block));
	sent += size;
	shutdown(fd, SHUT_WR);
	printf("{\"sent\": %ld, \"recv\": %ld}\n", sent, drain(fd));
	return 0;
}

static int serve(int port, int count)
{
	struct sockaddr_in6 a = {0};
	socklen_t len = sizeof(a);
	int fd = socket(AF_INET6, SOCK_STREAM, 0), off = 0, on = 1;

	a.sin6_family = AF_INET6;
	a.sin6_port = htons(port);
	a.sin6_addr = in6addr_any;
	setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 16) < 0) {
		perror("listen");
		return 1;
	}
	getsockname(fd, (struct sockaddr *)&a, &len);
	printf("ready %d\n", ntohs(a.sin6_port));
	fflush(stdout);
	for (int i = 0; i < count; i++) {
		int client = accept(fd, NULL, NULL);
		if (client < 0) {
			perror("accept");
			return 1;
		}
		drain(client);
		close(client);
	}
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

/* udp-threads: THREADS senders and THREADS receivers share one unconnected UDP socket; sender i
 * sends COUNT datagrams of 40 + 20 * i bytes to PORTS[i % n]; receivers tally what comes back
 * by source port until nothing has come for a second. */
#define MAX_PEERS 16
static struct {
	int fd, count, nports, ports[MAX_PEERS];
	const char *host;
	long sent[MAX_PEERS], recv[MAX_PEERS];
	pthread_mutex_t lock;
} shared;

static void *udp_sender(void *arg)
{
	int i = (int)(long)arg, peer = i % shared.nports, size = 40 + 20 * i;
	struct sockaddr_storage to;
	socklen_t len = address_of(shared.host, shared.ports[peer], &to);
	char buf[2048] = {0};
	long sent = 0;

	for (int k = 0; k < shared.count; k++) {
		ssize_t n = sendto(shared.fd, buf, size, 0, (struct sockaddr *)&to, len);
		if (n > 0)
			sent += n;
	}
	pthread_mutex_lock(&shared.lock);
	shared.sent[peer] += sent;
	pthread_mutex_unlock(&shared.lock);
	return NULL;
}

static void *udp_receiver(void *arg)
{
	struct sockaddr_storage from;
	char buf[2048];

	(void)arg;
	for (;;) {
		socklen_t len = sizeof(from);
		ssize_t n = recvfrom(shared.fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &len);
		int port;

		if (n < 0)
			return NULL;  /* a second without datagrams */
		port = ntohs(((struct sockaddr_in *)&from)->sin_port);  /* same offset in sockaddr_in6 */
		pthread_mutex_lock(&shared.lock);
		for (int p = 0; p < shared.nports; p++)
			if (shared.ports[p] == port)
				shared.recv[p] += n;
		pthread_mutex_unlock(&shared.lock);
	}
}

static int udp_threads(const char *host, int threads, int count, int nports, char **ports)
{
	pthread_t senders[MAX_PEERS], receivers[MAX_PEERS];
	struct timeval tv = {1, 0};
	struct sockaddr_storage ss;
	long sent = 0, recv = 0;

	if (threads > MAX_PEERS || nports > MAX_PEERS)
		return 2;
	address_of(host, 0, &ss);
	shared.fd = socket(ss.ss_family, SOCK_DGRAM, 0);
	setsockopt(shared.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	shared.host = host;
	shared.count = count;
	shared.nports = nports;
	for (int p = 0; p < nports; p++)
		shared.ports[p] = atoi(ports[p]);
	pthread_mutex_init(&shared.lock, NULL);
	for (long i = 0; i < threads; i++) {
		pthread_create(&receivers[i], NULL, udp_receiver, NULL);
		pthread_create(&senders[i], NULL, udp_sender, (void *)i);
	}
	for (int i = 0; i < threads; i++)
		pthread_join(senders[i], NULL);
	for (int i = 0; i < threads; i++)
		pthread_join(receivers[i], NULL);
	printf("{\"peers\": {");
	for (int p = 0; p < nports; p++) {
		printf("%s\"%d\": [%ld, %ld]", p ? ", " : "", shared.ports[p], shared.sent[p], shared.recv[p]);
		sent += shared.sent[p];
		recv += shared.recv[p];
	}
	printf("}, \"sent\": %ld, \"recv\": %ld}\n", sent, recv);
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
	if (argc >= 6 && !strcmp(argv[1], "named"))
		return named(argv[2], atoi(argv[3]), atol(argv[4]), argv[5]);
	if (argc >= 4 && !strcmp(argv[1], "serve"))
		return serve(atoi(argv[2]), atoi(argv[3]));
	if (argc >= 6 && !strcmp(argv[1], "udp-threads"))
		return udp_threads(argv[2], atoi(argv[3]), atoi(argv[4]), argc - 5, argv + 5);
	fprintf(stderr, "usage: netops uring|mmsg|quick|named|serve|mmsg-send|mmsg-recv|udp-threads ...\n");
	return 2;
}
