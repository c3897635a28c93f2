#include <stdio.h>
#include <signal.h>
#include <setjmp.h>
#include <string.h>
static sigjmp_buf jb;
static volatile void *addr;
static void h(int sig, siginfo_t *si, void *uc) { addr = si->si_addr; siglongjmp(jb, sig); }
int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, 0);
    for (int i = 0; i < 3; i++) {
        int r = sigsetjmp(jb, 1);
        if (r == 0) { *(volatile int *)(0x1000 + i * 8) = 5; printf("not reached\n"); }
        else printf("caught %d at %p\n", r, (void *)addr);
    }
    return 0;
}
