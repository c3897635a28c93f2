#include <stdio.h>
int main(void) {
    printf("hello, world\n");
    for (int i = -3; i < 300; i += 37) printf("%d %u %x %05d|%-4d|\n", i, (unsigned)i * 7u, i * 13, i, i);
    fprintf(stderr, "to stderr %ld\n", 123456789L);
    return 0;
}
