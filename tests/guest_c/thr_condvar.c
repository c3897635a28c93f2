/* A bounded queue: mutex + condition variables, two producers and two consumers. */
#include <pthread.h>
#include <stdio.h>

#define CAP 4
#define PER_PRODUCER 500

static int buf[CAP], head, count, done_producers;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER, not_empty = PTHREAD_COND_INITIALIZER;
static long consumed_sum[2], consumed_n[2];

static void *producer(void *arg)
{
    int base = (int)(long)arg * 100000;
    for (int i = 1; i <= PER_PRODUCER; i++) {
        pthread_mutex_lock(&mu);
        while (count == CAP)
            pthread_cond_wait(&not_full, &mu);
        buf[(head + count) % CAP] = base + i;
        count++;
        pthread_cond_signal(&not_empty);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    done_producers++;
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&mu);
    return NULL;
}

static void *consumer(void *arg)
{
    int me = (int)(long)arg;
    for (;;) {
        pthread_mutex_lock(&mu);
        while (count == 0 && done_producers < 2)
            pthread_cond_wait(&not_empty, &mu);
        if (count == 0) {
            pthread_mutex_unlock(&mu);
            return NULL;
        }
        int v = buf[head];
        head = (head + 1) % CAP;
        count--;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&mu);
        consumed_sum[me] += v;
        consumed_n[me]++;
    }
}

int main(void)
{
    pthread_t p[2], c[2];
    for (long i = 0; i < 2; i++)
        pthread_create(&c[i], NULL, consumer, (void *)i);
    for (long i = 0; i < 2; i++)
        pthread_create(&p[i], NULL, producer, (void *)i);
    for (int i = 0; i < 2; i++)
        pthread_join(p[i], NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(c[i], NULL);
    printf("items %ld sum %ld\n", consumed_n[0] + consumed_n[1], consumed_sum[0] + consumed_sum[1]);
    printf("queue empty: %s\n", count == 0 ? "yes" : "no");
    return 0;
}
