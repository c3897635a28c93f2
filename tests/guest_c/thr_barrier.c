/* pthread_barrier: phases of work; each phase sees every thread's result of the previous one. */
#include <pthread.h>
#include <stdio.h>

#define T 4
#define PHASES 5

static pthread_barrier_t bar;
static long val[T], check[PHASES][T];
static int serial_count;

static void *work(void *arg)
{
    int id = (int)(long)arg;
    for (int p = 0; p < PHASES; p++) {
        val[id] = val[id] * 3 + id + p;
        if (pthread_barrier_wait(&bar) == PTHREAD_BARRIER_SERIAL_THREAD)
            __atomic_add_fetch(&serial_count, 1, __ATOMIC_SEQ_CST);
        long s = 0;
        for (int i = 0; i < T; i++)
            s += val[i];
        check[p][id] = s;
        pthread_barrier_wait(&bar);
    }
    return NULL;
}

int main(void)
{
    pthread_t t[T];
    pthread_barrier_init(&bar, NULL, T);
    for (long i = 0; i < T; i++)
        pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < T; i++)
        pthread_join(t[i], NULL);
    for (int p = 0; p < PHASES; p++) {
        int same = 1;
        for (int i = 1; i < T; i++)
            same &= check[p][i] == check[p][0];
        printf("phase %d: sum %ld agreed %d\n", p, check[p][0], same);
    }
    printf("serial threads: %d\n", serial_count);
    pthread_barrier_destroy(&bar);
    return 0;
}
