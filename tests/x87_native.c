/* Native i386 oracle for tests/test_x87.py: stdin = u32 code_len, code, u32 data_len, data.
   Code is mapped at 0x10000000 (it ends in RET), data at 0x10010000; runs from the FNINIT
   state and writes the data region to stdout. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

static unsigned char in[0x30000];
void *fnp;

int main(void)
{
    size_t n = fread(in, 1, sizeof in, stdin);
    unsigned cl, dl;
    unsigned char *p = mmap((void *)0x10000000, 0x20000, PROT_READ | PROT_WRITE | PROT_EXEC,
                            MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED || n < 8)
        return 2;
    memcpy(&cl, in, 4);
    memcpy(p, in + 4, cl);
    memcpy(&dl, in + 4 + cl, 4);
    memcpy(p + 0x10000, in + 8 + cl, dl);
    fnp = p;
    __asm__ volatile("pushal\n\tfninit\n\tcall *fnp\n\tpopal\n\tfninit" ::: "memory");
    fwrite(p + 0x10000, 1, dl, stdout);
    return 0;
}
