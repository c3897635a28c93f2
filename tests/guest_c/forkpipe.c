#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
int main(void) {
    int p[2];
    pipe(p);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        close(p[0]);
        const char *msg = "message from child";
        write(p[1], msg, strlen(msg));
        _exit(42);
    }
    close(p[1]);
    char buf[100] = {0};
    ssize_t n, tot = 0;
    while ((n = read(p[0], buf + tot, sizeof buf - 1 - tot)) > 0) tot += n;
    int st;
    waitpid(pid, &st, 0);
    printf("got '%s' exited=%d status=%d\n", buf, WIFEXITED(st), WEXITSTATUS(st));
    pid = fork();
    if (pid == 0) { *(volatile int *)0 = 1; return 0; }
    waitpid(pid, &st, 0);
    printf("child2 signaled=%d sig=%d\n", WIFSIGNALED(st), WTERMSIG(st));
    return 0;
}
