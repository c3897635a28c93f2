/* A non-rt signal frame has Linux's layout (struct sigframe_ia32): the handler's argument is
   followed by the sigcontext, an unused struct _fpstate_32 (624 bytes) and extramask, the high
   word of the blocked mask; sigreturn restores that mask. */
#include <stdio.h>
#include <signal.h>
#include <string.h>

static volatile unsigned int seen_extramask, seen_oldmask_has_usr2;

static void h(int sig) {
    unsigned char *sc;
    /* The frame lies past the argument: launder the pointer so the compiler reads it. */
    __asm__ volatile("" : "=r"(sc) : "0"((unsigned char *)&sig + 4));
    unsigned int oldmask, extramask;
    memcpy(&oldmask, sc + 80, 4);
    memcpy(&extramask, sc + 88 + 624, 4);
    seen_extramask = extramask;
    seen_oldmask_has_usr2 = (oldmask >> (SIGUSR2 - 1)) & 1;
}

int main(void) {
    sigset_t set, now;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGRTMIN + 2);
    sigprocmask(SIG_BLOCK, &set, 0);
    signal(SIGUSR1, h);
    raise(SIGUSR1);
    sigprocmask(SIG_BLOCK, 0, &now);
    printf("extramask %#x, oldmask has SIGUSR2 %u, after return: SIGUSR2 %d, SIGRTMIN+2 %d\n",
           seen_extramask, seen_oldmask_has_usr2, sigismember(&now, SIGUSR2), sigismember(&now, SIGRTMIN + 2));
    return 0;
}
