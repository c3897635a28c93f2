/* pthread_cancel of threads parked in a sleep and in a condition wait: cleanup handlers run (the unwinder
 * executes RDSSPD, a NOP without CET), and join returns PTHREAD_CANCELED. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static void cleanup(void *a){ printf("cleanup %s\n", (char *)a); pthread_mutex_unlock(&mu); }
static void *sleeper(void *a){ pthread_cleanup_push(cleanup, "sleeper"); sleep(100); pthread_cleanup_pop(0); return NULL; }
static void *waiter(void *a){ pthread_mutex_lock(&mu); pthread_cleanup_push(cleanup, "waiter"); for(;;) pthread_cond_wait(&cv, &mu); pthread_cleanup_pop(0); return NULL; }
int main(void){
  pthread_t a, b; void *r1, *r2;
  pthread_create(&a, NULL, sleeper, NULL);
  pthread_create(&b, NULL, waiter, NULL);
  usleep(50000);
  pthread_cancel(a); pthread_join(a, &r1);
  pthread_cancel(b); pthread_join(b, &r2);
  printf("canceled: %d %d\n", r1 == PTHREAD_CANCELED, r2 == PTHREAD_CANCELED);
  return 0;
}
