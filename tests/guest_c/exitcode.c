#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
static void hu(int s) { write(1, "usr1\n", 5); }
int main(int argc, char **argv) {
    printf("mode %s\n", argc > 1 ? argv[1] : "none");
    fflush(stdout);
    if (argc > 1 && !strcmp(argv[1], "abort")) abort();
    if (argc > 1 && !strcmp(argv[1], "kill")) raise(SIGTERM);
    if (argc > 1 && !strcmp(argv[1], "handler")) { signal(SIGUSR1, hu); raise(SIGUSR1); }
    exit(argc > 1 ? atoi(argv[1]) : 0);
}
