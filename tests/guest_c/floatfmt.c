#include <stdio.h>
int main(int argc, char **argv) {
    volatile double x = 3.25 * argc;
    printf("%f %.3f %g %e\n", x, x / 7, x * 1e10, x - 100);
    return 0;
}
