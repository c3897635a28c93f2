#include <stdio.h>
#include <signal.h>
#include <setjmp.h>
static sigjmp_buf jb;
static void h(int sig) { siglongjmp(jb, sig); }
int main(void) {
    signal(SIGILL, h);
    if (sigsetjmp(jb, 1) == 0) __asm__ volatile("ud2");
    else printf("caught SIGILL\n");
    fflush(stdout);
    signal(SIGILL, SIG_DFL);
    __asm__ volatile("ud2");
    return 0;
}
