#include <stdio.h>
#include <signal.h>
#include <setjmp.h>
#include <string.h>
#include <unistd.h>
static sigjmp_buf jb;
static void h(int sig) { siglongjmp(jb, sig); }
int main(int argc, char **argv) {
    volatile int zero = argc - 1;
    signal(SIGFPE, h);
    if (sigsetjmp(jb, 1) == 0) printf("%d\n", 10 / zero);
    else printf("caught SIGFPE\n");
    fflush(stdout);
    signal(SIGFPE, SIG_DFL);
    printf("%d\n", 10 / zero);
    return 0;
}
