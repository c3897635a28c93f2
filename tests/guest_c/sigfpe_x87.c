/* An unmasked x87 exception (after FLDCW, or an image loaded by FRSTOR with one pending)
   raises SIGFPE at the next waiting FPU instruction, with the si_code Linux derives from the
   status word (FPE_FLTDIV here). */
#include <stdio.h>
#include <signal.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>
static void h(int sig, siginfo_t *si, void *uc) { printf("signal %d code %d\n", sig, si->si_code); fflush(stdout); _exit(3); }
int main(int argc, char **argv) {
    struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_sigaction = h; sa.sa_flags = SA_SIGINFO;
    sigaction(SIGFPE, &sa, 0);
    if (argc > 1) {
        unsigned char img[108]; memset(img, 0, sizeof img);
        img[0] = 0x60; img[1] = 0x03;   /* cw: all unmasked */
        img[4] = 0x84; img[5] = 0x80;   /* sw: ES | ZE, B */
        img[8] = 0xff; img[9] = 0xff;
        __asm__ volatile("frstor %0" :: "m"(img));
        __asm__ volatile("fld1\n\tfstp %%st(0)" ::: "memory");
        printf("no trap\n");
        return 0;
    }
    unsigned short cw = 0x0360;
    double r;
    __asm__ volatile("fldcw %1\n\tfld1\n\tfldz\n\tfdivrp\n\tfstpl %0\n\tfwait" : "=m"(r) : "m"(cw));
    printf("no trap %g\n", r);
    return 0;
}
