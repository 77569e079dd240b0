/* A program of its own for the alert tests: each test copies it to a path of its own, so its
 * baseline is its own, apart from every other program on the machine.
 *   alert_client connect HOST PORT SIZE [NAME]   connect, send an HTTP request naming NAME in its
 *                                                Host header (when given), then SIZE bytes, read
 *                                                until EOF
 *   alert_client serve PORT COUNT                listen on PORT (IPv4 and IPv6; 0: any), say
 *                                                "ready PORT", read COUNT connections until EOF,
 *                                                exit
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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

static void drain(int fd)
{
	char buf[65536];
	while (recv(fd, buf, sizeof(buf), 0) > 0)
		;
}

static int connect_to(const char *host, int port)
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
	int fd = socket(ss.ss_family, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&ss, len) < 0) {
		perror("connect");
		exit(1);
	}
	return fd;
}

static int do_connect(const char *host, int port, long size, const char *name)
{
	int fd = connect_to(host, port);
	if (name) {
		char request[512];
		int n = snprintf(request, sizeof(request), "GET / HTTP/1.1\r\nHost: %s\r\nAccept: */*\r\n\r\n", name);
		send_all(fd, request, n);
	}
	static char block[65536];
	memset(block, 'a', sizeof(block));
	while (size > 0) {
		size_t chunk = size < (long)sizeof(block) ? (size_t)size : sizeof(block);
		send_all(fd, block, chunk);
		size -= chunk;
	}
	shutdown(fd, SHUT_WR);
	drain(fd);
	close(fd);
	return 0;
}

static int do_serve(int port, int count)
{
	int fd = socket(AF_INET6, SOCK_STREAM, 0), off = 0, on = 1;
	struct sockaddr_in6 a = {0};
	a.sin6_family = AF_INET6;
	a.sin6_port = htons(port);
	a.sin6_addr = in6addr_any;
	setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 16) < 0) {
		perror("listen");
		return 1;
	}
	socklen_t len = sizeof(a);
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
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc >= 5 && !strcmp(argv[1], "connect"))
		return do_connect(argv[2], atoi(argv[3]), atol(argv[4]), argc >= 6 ? argv[5] : NULL);
	if (argc >= 4 && !strcmp(argv[1], "serve"))
		return do_serve(atoi(argv[2]), atoi(argv[3]));
	fprintf(stderr, "usage: alert_client connect HOST PORT SIZE [NAME] | serve PORT COUNT\n");
	return 2;
}
