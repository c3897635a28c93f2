#include <stdio.h>
#include <stdlib.h>
extern char **environ;
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    const char *v = getenv("BTVM_TEST_VAR");
    printf("BTVM_TEST_VAR=%s\n", v ? v : "(unset)");
    int n = 0;
    for (char **e = environ; *e; e++) n++;
    printf("env count>0: %d\n", n > 0);
    return argc;
}
