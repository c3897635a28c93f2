#include <stdio.h>
#include <stdint.h>
#include <inttypes.h>
int main(int argc, char **argv) {
    volatile uint64_t a = 0x123456789abcdef0ULL + (uint64_t)argc;
    volatile int64_t b = -987654321012345LL;
    uint64_t x = 1;
    for (int i = 0; i < 40; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    printf("%" PRIu64 " %" PRId64 " %" PRIx64 "\n", a, b, x);
    printf("%" PRIu64 " %" PRId64 " %" PRIu64 " %" PRId64 "\n", a / 12345, b / 777, a % 1000003, b % 99991);
    printf("%" PRId64 " %" PRIu64 "\n", b * 3 >> 5, a << 13 | a >> 51);
    return 0;
}
