#include "threadpool.h"

#include <stdlib.h>

#if defined(_WIN32) || !defined(BN_HAVE_PTHREADS)

static int g_threads = 1;
void bn_pool_lock(void) {}
void bn_pool_unlock(void) {}
void bn_pool_run(bn_task_fn fn, void *ctx, int64_t items, int64_t grain) {
    (void)grain;
    if (items > 0) fn(ctx, 0, 0, items);
}
int bn_pool_set_threads(int n) {
    (void)n;
    return g_threads;
}
int bn_pool_threads(void) { return g_threads; }

#else

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define BN_MAX_THREADS 256
#define SPIN_ROUNDS 4000 /* pause instructions a worker spins for before it sleeps (~0.1-0.3 ms) */

static struct {
    pthread_mutex_t run_lock; /* one operation at a time */
    pthread_mutex_t lock;     /* guards sleeping workers' wake-up */
    pthread_cond_t wake;
    pthread_t tids[BN_MAX_THREADS];
    int size;    /* threads including the caller */
    int started; /* workers running */
    atomic_uint generation;
    unsigned start_generation;
    atomic_int stop;
    /* the current run's claim word: run number (24 bits) | chunks (20 bits) | next chunk (20 bits). A thread
     * claims a chunk with one compare-and-swap, so it never claims from a run that is over; once its claim
     * succeeds the run cannot end before that chunk is done, so the fields below are stable for it. */
    atomic_uint_fast64_t claim;
    atomic_int_fast64_t finished;
    int64_t items, grain;
    bn_task_fn fn;
    void *ctx;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, {0}, 1, 0, 0, 0, 0, 0, 0,
          0, 0, NULL, NULL};

#define CHUNK_BITS 20
#define CHUNK_MASK ((1u << CHUNK_BITS) - 1)
#define RUN_MASK 0xffffffu
static uint_fast64_t claim_word(unsigned run, int64_t chunks, int64_t next) {
    return (uint_fast64_t)(run & RUN_MASK) << (2 * CHUNK_BITS) | (uint_fast64_t)chunks << CHUNK_BITS |
           (uint_fast64_t)next;
}

/* Claim and run chunks of run `gen` until none is left. */
static void work(unsigned gen, int tid) {
    for (;;) {
        uint_fast64_t c = atomic_load(&pool.claim);
        int64_t next = (int64_t)(c & CHUNK_MASK), chunks = (int64_t)((c >> CHUNK_BITS) & CHUNK_MASK);
        if ((unsigned)(c >> (2 * CHUNK_BITS)) != (gen & RUN_MASK) || next >= chunks) return;
        if (!atomic_compare_exchange_weak(&pool.claim, &c, c + 1)) continue;
        int64_t begin = next * pool.grain, end = begin + pool.grain < pool.items ? begin + pool.grain : pool.items;
        pool.fn(pool.ctx, tid, begin, end);
        atomic_fetch_add(&pool.finished, 1);
    }
}

static void *worker_main(void *arg) {
    int tid = (int)(size_t)arg;
    unsigned seen = pool.start_generation; /* not the live counter: a run may already be posted */
    for (;;) {
        unsigned g = seen;
        for (int i = 0; i < SPIN_ROUNDS && (g = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.stop);
             i++)
            cpu_relax();
        if (g == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((g = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.stop))
                pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        if (atomic_load(&pool.stop)) return NULL;
        seen = g;
        work(g, tid);
    }
}

static void stop_workers(void) {
    if (!pool.started) return;
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.stop, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 1; i < pool.size; i++) pthread_join(pool.tids[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.started = 0;
}

static void start_workers(void) {
    pool.start_generation = atomic_load(&pool.generation);
    for (int i = 1; i < pool.size; i++)
        if (pthread_create(&pool.tids[i], NULL, worker_main, (void *)(size_t)i) != 0) {
            pool.size = i; /* run with the threads we got */
            break;
        }
    pool.started = 1;
}

/* A forked child has none of the parent's workers: start over with fresh locks. */
static void after_fork_child(void) {
    pthread_mutex_init(&pool.run_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.started = 0;
    atomic_store(&pool.stop, 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_child); }

void bn_pool_lock(void) {
    pthread_once(&fork_once, register_fork_handler);
    pthread_mutex_lock(&pool.run_lock);
}

void bn_pool_unlock(void) { pthread_mutex_unlock(&pool.run_lock); }

/* Called with run_lock held. */
void bn_pool_run(bn_task_fn fn, void *ctx, int64_t items, int64_t grain) {
    if (items <= 0) return;
    if (grain < 1) grain = 1;
    if ((items + grain - 1) / grain > (int64_t)CHUNK_MASK) grain = (items + CHUNK_MASK - 1) / CHUNK_MASK;
    int64_t chunks = (items + grain - 1) / grain;
    if (pool.size <= 1 || chunks <= 1) {
        fn(ctx, 0, 0, items);
        return;
    }
    if (!pool.started) start_workers();
    unsigned gen = atomic_load(&pool.generation) + 1;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.items = items;
    pool.grain = grain;
    atomic_store(&pool.finished, 0);
    atomic_store(&pool.claim, claim_word(gen, chunks, 0));
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.generation, gen);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    work(gen, 0);
    /* only chunks other threads claimed remain: wait for those (a thread that claimed none is not waited for) */
    for (unsigned i = 0; atomic_load(&pool.finished) < chunks; i++)
        if (i > 4096) sched_yield();
        else cpu_relax();
}

int bn_pool_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > BN_MAX_THREADS) n = BN_MAX_THREADS;
    bn_pool_lock();
    if (n != pool.size) {
        stop_workers();
        pool.size = n;
    }
    bn_pool_unlock();
    return n;
}

int bn_pool_threads(void) { return pool.size; }

#endif
