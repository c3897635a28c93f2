/* A signal handler gets a fresh x87 state and the interrupted code gets its own back: the
   handler is entered with values on the x87 stack and a non-default control word, changes the
   rounding, leaves junk on the stack, and returns (rt and non-rt frames). */
#include <stdio.h>
#include <signal.h>
#include <string.h>

static volatile unsigned short handler_cw, handler_sw;
static volatile double handler_result;

static void work(void) {
    unsigned short cw, sw, up = 0x0B7F;             /* round up */
    volatile double x = 1.0;
    __asm__ volatile("fnstcw %0" : "=m"(cw));
    __asm__ volatile("fnstsw %0" : "=m"(sw));
    handler_cw = cw;
    handler_sw = sw;
    __asm__ volatile("fldcw %0" :: "m"(up));
    handler_result = x / 3.0;
    __asm__ volatile("fldpi\n\tfldpi\n\tfldpi\n");  /* left on the handler's stack */
}

static void h_rt(int sig, siginfo_t *si, void *uc) { (void)sig; (void)si; (void)uc; work(); }
static void h_old(int sig) { (void)sig; work(); }

static void round_trip(const char *name) {
    unsigned short down = 0x077F, dflt = 0x037F, cw_after, sw_after;
    double r;
    __asm__ volatile(
        "fldcw %3\n\t"
        "fld1\n\t"
        "fldpi\n\t"
        "int3\n\t"
        "faddp\n\t"
        "fstpl %0\n\t"
        "fnstcw %1\n\t"
        "fnstsw %2\n\t"
        "fldcw %4\n"
        : "=m"(r), "=m"(cw_after), "=m"(sw_after) : "m"(down), "m"(dflt));
    printf("%s: pi+1 = %.17g, cw after %#x, sw top after %d, handler cw %#x top %d, 1/3 up = %.17g\n",
           name, r, cw_after, (sw_after >> 11) & 7, handler_cw, (handler_sw >> 11) & 7, handler_result);
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h_rt;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &sa, 0);
    round_trip("rt");
    signal(SIGTRAP, h_old);
    round_trip("old");
    return 0;
}
