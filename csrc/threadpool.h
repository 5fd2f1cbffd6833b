/* A small persistent thread pool for the kernels: the calling thread is worker 0.
 *
 * Workers spin briefly after each job (decode calls the kernels back to back, a few microseconds apart),
 * then sleep on a condition variable so an idle process costs no CPU. Runs are serialized by a mutex, so
 * several Python threads may call kernels at once. Builds without pthreads run everything on the caller.
 */
#ifndef PYBITNET_THREADPOOL_H
#define PYBITNET_THREADPOOL_H

typedef void (*bn_task_fn)(void *ctx, int tid, int nthreads);

/* Run fn(ctx, tid, n) for tid in [0, n), n = min(the pool's size, max_tasks), and wait for all. */
void bn_pool_run(bn_task_fn fn, void *ctx, int max_tasks);
/* Lock / unlock the pool (and the scratch buffers the callers share) around a whole operation. */
void bn_pool_lock(void);
void bn_pool_unlock(void);
int bn_pool_set_threads(int n);
int bn_pool_threads(void);

#endif
