/* The smallest TCP client: waits DELAY milliseconds, connects to HOST PORT and sends SIZE bytes
 * (tests/test_daemon_exec_identity.py: a short-lived program, built with gcc for glibc's ld.so and
 * memfd, and with musl-gcc for musl's loader). */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	static char buf[65536];
	struct sockaddr_in to = {.sin_family = AF_INET};
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	long size;

	if (argc != 5 || inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
		fprintf(stderr, "usage: send IPV4 PORT SIZE DELAY_MS\n");
		return 2;
	}
	struct timespec delay = {.tv_sec = atol(argv[4]) / 1000, .tv_nsec = atol(argv[4]) % 1000 * 1000000L};
	nanosleep(&delay, NULL);
	to.sin_port = htons(atoi(argv[2]));
	size = atol(argv[3]);
	if (size > (long)sizeof(buf) || connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0)
		return 1;
	memset(buf, 'm', sizeof(buf));
	return write(fd, buf, size) == size ? 0 : 1;
}
