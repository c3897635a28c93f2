/* EFLAGS.TF set by the program itself (PUSHF/OR/POPF): each instruction after the POPF ends with
   a SIGTRAP (si_code TRAP_TRACE, si_addr and the saved EIP the next instruction, trapno 1); the
   POPF that sets TF is not trapped, INT $0x80 is not trapped (the trap follows the instruction
   after it), and the handler stops the stepping by clearing TF in the saved EFLAGS. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

extern char s1_0[], s1_end[], s2_0[], s2_end[], s3_0[];
static volatile int traps, limit;
static unsigned long eip[32], addr[32], efl[32];
static int code[32], trapno[32], err[32], signo[32];

static void on_trap(int sig, siginfo_t *si, void *ctx) {
    ucontext_t *uc = ctx;
    int n = traps;
    if (n < 32) {
        signo[n] = sig;
        code[n] = si->si_code;
        addr[n] = (unsigned long)si->si_addr;
        eip[n] = uc->uc_mcontext.gregs[REG_EIP];
        efl[n] = uc->uc_mcontext.gregs[REG_EFL];
        trapno[n] = uc->uc_mcontext.gregs[REG_TRAPNO];
        err[n] = uc->uc_mcontext.gregs[REG_ERR];
    }
    traps = n + 1;
    if (traps >= limit)
        uc->uc_mcontext.gregs[REG_EFL] &= ~0x100;   /* stop stepping */
}

static void report(const char *what, const char *base) {
    printf("%s: %d traps\n", what, traps);
    for (int i = 0; i < traps && i < 32; i++)
        printf("  sig=%d code=%d trapno=%d err=%d eip=+%ld addr=+%ld tf=%d\n", signo[i], code[i], trapno[i],
               err[i], (long)(eip[i] - (unsigned long)base), (long)(addr[i] - (unsigned long)base),
               (int)(efl[i] >> 8) & 1);
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &sa, 0);

    /* four instructions after the POPF, the handler clears TF at the fourth trap */
    traps = 0;
    limit = 4;
    __asm__ volatile(
        "pushfl\n\t"
        "orl $0x100, (%%esp)\n\t"
        "popfl\n"
        "s1_0:\n\t"
        "movl $1, %%eax\n\t"
        "addl $2, %%eax\n\t"
        "nop\n\t"
        "xchgl %%eax, %%ecx\n\t"
        "nop\n\t"
        "nop\n"
        "s1_end:\n\t"
        ::: "eax", "ecx", "cc", "memory");
    report("popf sets TF", s1_0);

    /* a system call under TF: no trap for INT $0x80 itself; a POPF clearing TF is trapped */
    traps = 0;
    limit = 100;
    __asm__ volatile(
        "pushfl\n\t"
        "pushfl\n\t"
        "orl $0x100, (%%esp)\n\t"
        "popfl\n"
        "s2_0:\n\t"
        "movl $20, %%eax\n\t"
        "int $0x80\n\t"
        "nop\n\t"
        "popfl\n\t"
        "nop\n"
        "s2_end:\n\t"
        ::: "eax", "cc", "memory");
    report("int 0x80 and popf clearing TF", s2_0);

    /* branches, a call and a return under TF */
    traps = 0;
    limit = 100;
    __asm__ volatile(
        "pushfl\n\t"
        "pushfl\n\t"
        "orl $0x100, (%%esp)\n\t"
        "popfl\n"
        "s3_0:\n\t"
        "movl $2, %%ecx\n"
        "1:\n\t"
        "decl %%ecx\n\t"
        "jnz 1b\n\t"
        "call 2f\n\t"
        "jmp 3f\n"
        "2:\n\t"
        "ret\n"
        "3:\n\t"
        "popfl\n\t"
        ::: "ecx", "cc", "memory");
    report("branches, call, ret", s3_0);
    return 0;
}
