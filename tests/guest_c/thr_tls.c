/* __thread variables are distinct per thread; the main thread's copy is untouched. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

static __thread int counter = 7;
static __thread char name[16] = "main";
static int seen[4];
static char names[4][16];

static void *work(void *arg)
{
    int id = (int)(long)arg;
    snprintf(name, sizeof name, "worker%d", id);
    for (int i = 0; i < 1000 * (id + 1); i++) {
        counter++;
        if (i % 100 == 0)
            sched_yield();
    }
    seen[id] = counter;
    strcpy(names[id], name);
    return &counter;
}

int main(void)
{
    pthread_t t[4];
    void *addr[4];
    for (long i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], &addr[i]);
    for (int i = 0; i < 4; i++)
        printf("thread %d: counter %d name %s\n", i, seen[i], names[i]);
    int distinct = 1;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < i; j++)
            if (addr[i] == addr[j])
                distinct = 0;
    printf("main: counter %d name %s, addresses distinct: %d, main's differs: %d\n", counter, name,
           distinct, addr[0] != (void *)&counter);
    return 0;
}
