/* Thread odds and ends: tids, pthread_kill with a handler, timed waits that time out, sleeping
 * threads, a detached thread, fork from a threaded process, and a thread's exit status via join. */
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got_usr1;
static volatile pid_t handler_tid;
static pid_t worker_tid;
static sem_t ready, go, detached_done, never;

static void on_usr1(int sig)
{
    got_usr1 = sig;
    handler_tid = syscall(SYS_gettid);
}

static void *waiter(void *arg)
{
    worker_tid = syscall(SYS_gettid);
    sem_post(&ready);
    while (!got_usr1)
        sem_wait(&go);          /* interrupted by the signal (EINTR) or posted */
    return (void *)(long)(worker_tid != getpid());
}

static void *sleeper(void *arg)
{
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
    return (void *)42L;
}

static void *detached(void *arg)
{
    sem_post(&detached_done);
    return NULL;
}

static volatile sig_atomic_t got_usr2;
static pthread_t main_thread;

static void on_usr2(int sig)
{
    got_usr2 = sig;
}

static void *kicker(void *arg)
{
    pthread_kill(main_thread, SIGUSR2);
    return NULL;
}

static void *forker(void *arg)
{
    pid_t pid = fork();
    if (pid == 0) {
        printf("child: alive\n");
        fflush(stdout);
        _exit(7);
    }
    int st;
    waitpid(pid, &st, 0);
    return (void *)(long)WEXITSTATUS(st);
}

int main(void)
{
    pthread_t t;
    void *ret;
    sem_init(&ready, 0, 0);
    sem_init(&go, 0, 0);
    sem_init(&detached_done, 0, 0);
    sem_init(&never, 0, 0);
    signal(SIGUSR1, on_usr1);

    printf("main: gettid == getpid: %d\n", (pid_t)syscall(SYS_gettid) == getpid());

    pthread_create(&t, NULL, waiter, NULL);
    sem_wait(&ready);
    pthread_kill(t, SIGUSR1);
    sem_post(&go);
    pthread_join(t, &ret);
    printf("signal %d handled in the target thread: %d, worker tid differs from pid: %ld\n", got_usr1,
           handler_tid == worker_tid, (long)ret);

    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_nsec += 30 * 1000 * 1000;
    if (dl.tv_nsec >= 1000000000) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&mu);
    int r = pthread_cond_timedwait(&cv, &mu, &dl);
    pthread_mutex_unlock(&mu);
    printf("cond_timedwait: %s\n", r == ETIMEDOUT ? "ETIMEDOUT" : "other");

    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_nsec = dl.tv_nsec / 2;
    errno = 0;
    r = sem_timedwait(&never, &dl);
    printf("sem_timedwait in the past: %d %s\n", r, errno == ETIMEDOUT ? "ETIMEDOUT" : "other");

    pthread_t s1, s2;
    pthread_create(&s1, NULL, sleeper, NULL);
    pthread_create(&s2, NULL, sleeper, NULL);
    void *r1, *r2;
    pthread_join(s1, &r1);
    pthread_join(s2, &r2);
    printf("sleepers: %ld %ld\n", (long)r1, (long)r2);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_create(&t, &attr, detached, NULL);
    sem_wait(&detached_done);
    printf("detached thread ran\n");
    fflush(stdout);

    pthread_create(&t, NULL, forker, NULL);
    pthread_join(t, &ret);
    printf("forked child status %ld\n", (long)ret);

    sigset_t block, old, wait;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, &old);
    signal(SIGUSR2, on_usr2);
    main_thread = pthread_self();
    pthread_create(&t, NULL, kicker, NULL);
    sigfillset(&wait);
    sigdelset(&wait, SIGUSR2);
    r = sigsuspend(&wait);
    sigset_t now;
    sigprocmask(SIG_SETMASK, NULL, &now);
    printf("sigsuspend: %d errno %s got %d, mask restored: %d\n", r, errno == EINTR ? "EINTR" : "other",
           got_usr2, sigismember(&now, SIGUSR2));
    pthread_join(t, NULL);
    return 3;
}
