/* A small persistent thread pool for the kernels: the calling thread works too.
 *
 * A run splits [0, items) into chunks of `grain` items that threads claim one at a time from a shared counter,
 * so when a worker is descheduled (a machine shared with other processes) the others take its chunks instead
 * of waiting for it. Workers spin briefly between runs (decode calls the kernels back to back, microseconds
 * apart), then sleep on a condition variable, so an idle process costs no CPU. Runs are serialized by a lock.
 * Builds without pthreads run everything on the caller.
 */
#ifndef PYBITNET_THREADPOOL_H
#define PYBITNET_THREADPOOL_H

#include <stdint.h>

/* Process items [begin, end) on thread `tid` (0 <= tid < bn_pool_threads()). */
typedef void (*bn_task_fn)(void *ctx, int tid, int64_t begin, int64_t end);

/* Run fn over [0, items) in chunks of `grain` (>= 1) and return when every chunk is done. */
void bn_pool_run(bn_task_fn fn, void *ctx, int64_t items, int64_t grain);
/* Lock / unlock the pool (and the scratch buffers the callers share) around a whole operation. */
void bn_pool_lock(void);
void bn_pool_unlock(void);
int bn_pool_set_threads(int n);
int bn_pool_threads(void);

#endif
