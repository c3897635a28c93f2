/* N threads each sum a range; results printed after all joins (deterministic output). */
#include <pthread.h>
#include <stdio.h>

#define N 6

struct job { int id; unsigned long long lo, hi, sum; pthread_t th; };

static void *work(void *arg)
{
    struct job *j = arg;
    unsigned long long s = 0;
    for (unsigned long long i = j->lo; i < j->hi; i++)
        s += i * i % 1000003;
    j->sum = s;
    return (void *)(long)(j->id * 10);
}

int main(void)
{
    struct job jobs[N];
    for (int i = 0; i < N; i++) {
        jobs[i].id = i;
        jobs[i].lo = i * 200000ULL;
        jobs[i].hi = (i + 1) * 200000ULL;
        if (pthread_create(&jobs[i].th, NULL, work, &jobs[i]) != 0) {
            printf("pthread_create failed\n");
            return 1;
        }
    }
    unsigned long long total = 0;
    for (int i = 0; i < N; i++) {
        void *ret;
        pthread_join(jobs[i].th, &ret);
        printf("thread %d: sum %llu ret %ld\n", i, jobs[i].sum, (long)ret);
        total += jobs[i].sum;
    }
    printf("total %llu\n", total);
    return 0;
}
