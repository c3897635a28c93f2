#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ctype.h>
static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
static int icmp(const void *a, const void *b) { int x = *(const int *)a, y = *(const int *)b; return (x > y) - (x < y); }
int main(void) {
    const char *w[] = {"pear", "apple", "fig", "banana", "cherry", "date", "elderberry", "grape"};
    char *v[8];
    for (int i = 0; i < 8; i++) v[i] = strdup(w[i]);
    qsort(v, 8, sizeof v[0], cmp);
    for (int i = 0; i < 8; i++) { for (char *p = v[i]; *p; p++) *p = toupper(*p); printf("%s%c", v[i], i == 7 ? '\n' : ' '); }
    int a[1000];
    unsigned s = 12345;
    for (int i = 0; i < 1000; i++) { s = s * 1103515245 + 12345; a[i] = (s >> 8) % 100000 - 50000; }
    qsort(a, 1000, sizeof a[0], icmp);
    printf("%d %d %d\n", a[0], a[500], a[999]);
    char buf[200];
    snprintf(buf, sizeof buf, "%s-%s-%d", v[0], v[7], (int)strlen(v[3]));
    printf("%s %zu %s\n", buf, strlen(buf), strstr(buf, "GRAPE") ? "found" : "no");
    char *m = malloc(100000); memset(m, 'x', 99999); m[99999] = 0;
    printf("%zu\n", strlen(m));
    free(m);
    return 0;
}
