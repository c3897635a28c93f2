#include <stdio.h>
#include <setjmp.h>
static jmp_buf jb;
static int depth(int n) { if (n == 0) longjmp(jb, 7); return depth(n - 1) + 1; }
int main(void) {
    int r = setjmp(jb);
    if (r == 0) { printf("first\n"); depth(50); }
    printf("back with %d\n", r);
    return 0;
}
