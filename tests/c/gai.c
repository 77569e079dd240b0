/* getaddrinfo(NAME) after DELAY seconds, printing the first address as JSON; with PORT, then
 * connects to that address and sends one byte. Built with musl-gcc by the tests, to resolve
 * through a C library other than the host's (dynamically linked, or static).
 *   gai NAME [DELAY [PORT]] */
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct addrinfo hints, *res;
	struct timespec delay = {0};
	char text[INET6_ADDRSTRLEN];
	void *addr;

	if (argc < 2)
		return 2;
	if (argc > 2) {
		double seconds = atof(argv[2]);
		delay.tv_sec = (time_t)seconds;
		delay.tv_nsec = (long)((seconds - delay.tv_sec) * 1e9);
		nanosleep(&delay, NULL);
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_socktype = SOCK_STREAM;
	if (getaddrinfo(argv[1], "80", &hints, &res)) {
		printf("{\"sent\": 0, \"recv\": 0, \"address\": null}\n");
		return 1;
	}
	if (res->ai_family == AF_INET)
		addr = &((struct sockaddr_in *)res->ai_addr)->sin_addr;
	else
		addr = &((struct sockaddr_in6 *)res->ai_addr)->sin6_addr;
	inet_ntop(res->ai_family, addr, text, sizeof(text));
	if (argc > 3) {
		int fd = socket(res->ai_family, SOCK_STREAM, 0);

		if (res->ai_family == AF_INET)
			((struct sockaddr_in *)res->ai_addr)->sin_port = htons(atoi(argv[3]));
		else
			((struct sockaddr_in6 *)res->ai_addr)->sin6_port = htons(atoi(argv[3]));
		if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) || write(fd, "x", 1) != 1)
			return 1;
		close(fd);
	}
	printf("{\"sent\": %d, \"recv\": 0, \"address\": \"%s\"}\n", argc > 3, text);
	return 0;
}
