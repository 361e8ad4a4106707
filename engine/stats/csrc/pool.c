/* One pool of threads.
 *
 * One pool per process, its workers started on first use (up to the `threads` a call asks for,
 * at most MAX_THREADS) and kept: an idle worker blocks on a condition variable, never spins, so
 * it costs nothing beside busy neighbours. A call cuts its work into pieces of `piece` units,
 * handed out from a shared counter: the calling thread takes pieces too, so a worker that the
 * scheduler has taken away holds up at most the one piece it took, never the call (a late worker
 * finds the call closed and goes back to sleep). Results never depend on which thread ran a
 * piece: every element, and every group of a sum, is computed alone. A second call made while the
 * pool is busy (another Python thread) runs on its own thread. Called without the GIL. */

#include "fused.h"

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    int nworkers, open, busy, want;
    unsigned long gen;
    PartFn fn;
    void *ctx;
    Py_ssize_t n, piece, npieces, next;
} Pool;

static Pool pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0,
                    NULL, NULL, 0, 0, 0, 0};
static pthread_mutex_t submitting = PTHREAD_MUTEX_INITIALIZER;

/* Take pieces until none is left; `slot` names the taker's scratch. */
static void take_pieces(PartFn fn, void *ctx, int slot, Py_ssize_t n, Py_ssize_t piece, Py_ssize_t npieces) {
    for (;;) {
        Py_ssize_t i = __atomic_fetch_add(&pool.next, 1, __ATOMIC_RELAXED);
        if (i >= npieces) return;
        Py_ssize_t lo = i * piece, hi = lo + piece < n ? lo + piece : n;
        fn(ctx, slot, lo, hi);
    }
}

static void *worker(void *arg) {
    int slot = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.gen == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.gen;
        if (!pool.open || slot >= pool.want) continue;
        PartFn fn = pool.fn;
        void *ctx = pool.ctx;
        Py_ssize_t n = pool.n, piece = pool.piece, npieces = pool.npieces;
        pool.busy++;
        pthread_mutex_unlock(&pool.mu);
        take_pieces(fn, ctx, slot, n, piece, npieces);
        pthread_mutex_lock(&pool.mu);
        if (--pool.busy == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

/* After fork() the child has none of the parent's workers: start afresh. */
void pool_after_fork(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_init(&submitting, NULL);
    pool.nworkers = pool.open = pool.busy = pool.want = 0;
}

/* Workers for `threads` threads in all (the caller is one); fewer where a thread cannot start. */
static int pool_grow(int threads) {
    while (pool.nworkers + 1 < threads) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int ok = pthread_create(&id, &attr, worker, (void *)(intptr_t)(pool.nworkers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.nworkers++;
    }
    return pool.nworkers + 1 < threads ? pool.nworkers + 1 : threads;
}

/* Pieces of `piece` units: ~64K elements each, a few tens of microseconds. */
Py_ssize_t piece_for(Py_ssize_t unit) { return (1 << 16) / unit > 0 ? (1 << 16) / unit : 1; }

/* fn over [0, n) in pieces of `piece`, on up to `threads` threads; slots < threads. */
void split(PartFn fn, void *ctx, Py_ssize_t n, Py_ssize_t piece, int threads) {
    Py_ssize_t npieces = (n + piece - 1) / piece;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > npieces) threads = (int)npieces;
    if (threads <= 1 || pthread_mutex_trylock(&submitting) != 0) {
        if (n > 0) fn(ctx, 0, 0, n);
        return;
    }
    pthread_mutex_lock(&pool.mu);
    threads = pool_grow(threads);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.piece = piece;
    pool.npieces = npieces;
    pool.want = threads;
    __atomic_store_n(&pool.next, 0, __ATOMIC_RELAXED);
    pool.open = 1;
    pool.gen++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    take_pieces(fn, ctx, 0, n, piece, npieces);
    pthread_mutex_lock(&pool.mu);
    pool.open = 0; /* a worker not yet awake stays out: the ctx is about to go */
    while (pool.busy > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&submitting);
}
