/* User-mode compute benchmark for tools/bench_user.py (built with gcc -m32 -O2 -static):
 * a small bytecode interpreter (dispatch-heavy, branchy) running a Collatz search, then a
 * greedy LZ77 compressor over generated text (memory-heavy).  Prints checksums that must be the
 * same natively, under qemu-i386 and under btvm.  Usage: bench_prog [SCALE_PERCENT] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { PUSH, LOAD, STORE, ADD, SUB, MUL, DIVU, MOD, JZ, JMP, LT, DUP, POP, HALT };

typedef struct { int op, arg; } Insn;

/* vars: 0 n (limit), 1 i, 2 x, 3 steps, 4 best: the longest Collatz chain below n */
static const Insn collatz[] = {
    /* 0 */ {PUSH, 1}, {STORE, 1}, {PUSH, 0}, {STORE, 4},
    /* 4 outer: while i < n */ {LOAD, 1}, {LOAD, 0}, {LT, 0}, {JZ, 47},
    /* 8 */ {LOAD, 1}, {STORE, 2}, {PUSH, 0}, {STORE, 3},
    /* 12 inner: while x != 1 */ {LOAD, 2}, {PUSH, 1}, {SUB, 0}, {JZ, 36},
    /* 16 */ {LOAD, 2}, {PUSH, 2}, {MOD, 0}, {JZ, 27},
    /* 20 odd: x = 3x + 1 */ {LOAD, 2}, {PUSH, 3}, {MUL, 0}, {PUSH, 1}, {ADD, 0}, {STORE, 2}, {JMP, 31},
    /* 27 even: x = x / 2 */ {LOAD, 2}, {PUSH, 2}, {DIVU, 0}, {STORE, 2},
    /* 31 steps++ */ {LOAD, 3}, {PUSH, 1}, {ADD, 0}, {STORE, 3}, {JMP, 12},
    /* 36 if best < steps: best = steps */ {LOAD, 4}, {LOAD, 3}, {LT, 0}, {JZ, 42}, {LOAD, 3}, {STORE, 4},
    /* 42 i++ */ {LOAD, 1}, {PUSH, 1}, {ADD, 0}, {STORE, 1}, {JMP, 4},
    /* 47 */ {HALT, 0},
};

static uint32_t run(const Insn *code, uint32_t *vars)
{
    uint32_t stack[64];
    int sp = 0, pc = 0;
    uint64_t executed = 0;
    for (;;) {
        const Insn in = code[pc++];
        executed++;
        switch (in.op) {
        case PUSH: stack[sp++] = (uint32_t)in.arg; break;
        case LOAD: stack[sp++] = vars[in.arg]; break;
        case STORE: vars[in.arg] = stack[--sp]; break;
        case ADD: sp--; stack[sp - 1] += stack[sp]; break;
        case SUB: sp--; stack[sp - 1] -= stack[sp]; break;
        case MUL: sp--; stack[sp - 1] *= stack[sp]; break;
        case DIVU: sp--; stack[sp - 1] /= stack[sp]; break;
        case MOD: sp--; stack[sp - 1] %= stack[sp]; break;
        case LT: sp--; stack[sp - 1] = stack[sp - 1] < stack[sp]; break;
        case DUP: stack[sp] = stack[sp - 1]; sp++; break;
        case POP: sp--; break;
        case JZ: if (stack[--sp] == 0) pc = in.arg; break;
        case JMP: pc = in.arg; break;
        case HALT: return (uint32_t)executed;
        }
    }
}

static uint32_t lz77(const uint8_t *src, int n, uint8_t *dst)
{
    enum { WINDOW = 4096, MINMATCH = 3, MAXMATCH = 18, HASH = 1 << 14 };
    static int32_t head[HASH];
    static int32_t prev[1 << 24];
    int out = 0;
    memset(head, -1, sizeof head);
    for (int i = 0; i < n;) {
        int best = 0, bestd = 0;
        if (i + MINMATCH <= n) {
            uint32_t h = ((src[i] << 10) ^ (src[i + 1] << 5) ^ src[i + 2]) & (HASH - 1);
            int cand = head[h], tries = 32;
            while (cand >= 0 && i - cand <= WINDOW && tries--) {
                int l = 0;
                while (l < MAXMATCH && i + l < n && src[cand + l] == src[i + l])
                    l++;
                if (l > best) { best = l; bestd = i - cand; }
                cand = prev[cand];
            }
            prev[i] = head[h];
            head[h] = i;
        }
        if (best >= MINMATCH) {
            dst[out++] = 0x80 | (uint8_t)(best - MINMATCH);
            dst[out++] = (uint8_t)(bestd >> 8);
            dst[out++] = (uint8_t)bestd;
            for (int k = 1; k < best; k++) {
                if (i + k + MINMATCH <= n) {
                    uint32_t h = ((src[i + k] << 10) ^ (src[i + k + 1] << 5) ^ src[i + k + 2]) & (HASH - 1);
                    prev[i + k] = head[h];
                    head[h] = i + k;
                }
            }
            i += best;
        } else {
            dst[out++] = src[i++] & 0x7f;
        }
    }
    uint32_t sum = 0;
    for (int k = 0; k < out; k++)
        sum = sum * 31 + dst[k];
    return sum ^ (uint32_t)out;
}

int main(int argc, char **argv)
{
    int scale = argc > 1 ? atoi(argv[1]) : 100;
    uint32_t vars[8] = {0};
    vars[0] = (uint32_t)(40000 * scale / 100 + 2);
    uint32_t executed = run(collatz, vars);
    printf("collatz: n=%u longest=%u steps, %u bytecodes\n", vars[0], vars[4], executed);

    int n = 1 << 22;
    n = (int)((int64_t)n * scale / 100);
    if (n < 1024) n = 1024;
    if (n > (1 << 24)) n = 1 << 24;
    uint8_t *src = malloc(n), *dst = malloc(n * 2 + 16);
    uint32_t seed = 12345;
    static const char *words[] = {"the", "translator", "block", "cache", "guest", "host", "page", "fault",
                                  "interrupt", "register", "flags", "native", "code", "chain", "hot", "cold"};
    for (int i = 0; i < n;) {
        seed = seed * 1103515245u + 12345u;
        const char *w = words[(seed >> 16) & 15];
        for (int k = 0; w[k] && i < n; k++)
            src[i++] = (uint8_t)w[k];
        if (i < n)
            src[i++] = (seed >> 8) & 7 ? ' ' : '\n';
    }
    printf("lz77: %d bytes, checksum %08x\n", n, lz77(src, n, dst));
    return 0;
}
