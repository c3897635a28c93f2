/* EFLAGS.AC with CR0.AM (Linux sets it on x86): a misaligned access at CPL 3 raises #AC, which
   Linux reports as SIGBUS with si_code BUS_ADRALN. */
#define _GNU_SOURCE
#include <stdio.h>
#include <signal.h>
#include <setjmp.h>
#include <string.h>
#include <ucontext.h>

static sigjmp_buf jb;
static volatile int sig, code, trapno, err, ctx_ac, handler_ac;
static volatile unsigned long addr;
static unsigned char buf[32] __attribute__((aligned(16)));

static unsigned eflags(void) {
    unsigned f;
    __asm__ volatile("pushf; pop %0" : "=r"(f));
    return f;
}

static void h(int s, siginfo_t *si, void *uc) {
    ucontext_t *u = uc;
    handler_ac = (eflags() >> 18) & 1;
    sig = s;
    code = si->si_code;
    addr = (unsigned long)si->si_addr;
    trapno = u->uc_mcontext.gregs[REG_TRAPNO];
    err = u->uc_mcontext.gregs[REG_ERR];
    ctx_ac = (u->uc_mcontext.gregs[REG_EFL] >> 18) & 1;
    siglongjmp(jb, 1);
}

#define AC_ON() __asm__ volatile("pushf; orl $0x40000,(%%esp); popf" ::: "memory", "cc")
#define AC_OFF() __asm__ volatile("pushf; andl $~0x40000,(%%esp); popf" ::: "memory", "cc")

static void try(const char *what, int off, int kind) {
    volatile unsigned v = 0;
    sig = code = trapno = err = ctx_ac = handler_ac = 0;
    addr = 1;
    for (int i = 0; i < 32; i++)
        buf[i] = i + 1;
    if (sigsetjmp(jb, 1) == 0) {
        AC_ON();
        switch (kind) {
        case 0: v = *(volatile unsigned *)(buf + off); break;
        case 1: v = *(volatile unsigned short *)(buf + off); break;
        case 2: *(volatile unsigned *)(buf + off) = 0x11223344; break;
        case 3: *(volatile unsigned short *)(buf + off) = 0x5566; break;
        case 4: v = *(volatile unsigned char *)(buf + off); break;
        }
        AC_OFF();
        printf("%-8s off=%2d: no fault, v=%#x\n", what, off, v);
    } else {
        AC_OFF();
        printf("%-8s off=%2d: signal %d si_code %d si_addr %#lx trapno %d err %d ctx AC %d handler AC %d\n",
               what, off, sig, code, addr, trapno, err, ctx_ac, handler_ac);
    }
    printf("  buf[0..8] = %02x %02x %02x %02x %02x %02x %02x %02x\n",
           buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7]);
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGBUS, &sa, 0);
    try("load32", 0, 0);
    try("load32", 1, 0);
    try("load32", 2, 0);
    try("load16", 2, 1);
    try("load16", 3, 1);
    try("store32", 4, 2);
    try("store32", 6, 2);
    try("store16", 6, 3);
    try("store16", 1, 3);
    try("load8", 3, 4);
    /* AC clear: misaligned accesses do not fault */
    printf("AC clear: %#x\n", *(volatile unsigned *)(buf + 3));
    return 0;
}
