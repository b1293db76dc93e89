// CUDA kernels run on the CPU, for the tests (tests/cudaemu.py): what kernels/*.cu need of CUDA C.
//
// A launch runs its blocks one after another; the threads of a block are coroutines (ucontext) on
// one OS thread, switched only at a barrier, in index order or (``emu_seed``) in an order shuffled
// anew between every two barriers, and the blocks in a shuffled order: each is an order a GPU could
// take. __syncthreads waits for every thread of the block, __syncwarp and the warp collectives
// (__match_any_sync, __shfl_down_sync; values exchanged as bits) for every lane of the warp (a last
// warp of fewer than 32 threads: its lanes; reading a lane with no thread gives a poison); a barrier
// some threads never reach (a divergent __syncthreads, threads that exited, a warp split between two
// barriers) ends the launch with an error instead of hanging: CUDA leaves those undefined.
// __shared__ arrays become the function's statics, filled with a byte pattern before every block
// (the GPU leaves them undefined). Atomics need nothing: threads never switch inside one. The runner's
// state has internal linkage: each compiled file has its own (tests/cudaemu.py launches one at a time).

#if defined(__APPLE__)
#define _XOPEN_SOURCE 600  // macOS keeps ucontext behind it
#endif
#include <ucontext.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct emu_dim3 {
    unsigned x, y, z;
};

namespace {  // each compiled file keeps its own runner (no GNU-unique symbols shared between them)
namespace emu {
enum State { RUN, BLOCK_BAR, WARP_BAR, DONE };
constexpr int MAX_WARPS = 32;
constexpr size_t STACK = 64 * 1024;  // per thread: the kernels' frames are small

struct Thread {
    ucontext_t ctx;
    emu_dim3 idx;
    State state;
};

inline emu_dim3 block_idx, block_dim, grid_dim;
inline Thread* cur = nullptr;
inline ucontext_t sched;
inline std::vector<Thread> threads;
inline std::vector<char> stacks;
inline const std::function<void()>* body = nullptr;
inline unsigned long long slot[MAX_WARPS][32];
inline bool filled[MAX_WARPS][32];
inline std::vector<std::pair<void*, size_t>> shared_arrays;  // poisoned before each block
inline unsigned long long seed = 0;  // not 0: threads run between barriers in an order shuffled by it
inline std::vector<unsigned> order;

inline void shuffle(unsigned n) {  // xorshift64 Fisher-Yates
    for (unsigned i = n - 1; i > 0; --i) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        unsigned j = (unsigned)(seed % (i + 1));
        unsigned t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

inline void wait(State s) {
    cur->state = s;
    swapcontext(&cur->ctx, &sched);
}

inline void trampoline() {
    (*body)();
    cur->state = DONE;  // uc_link returns to the scheduler
}

// Runs one block; false where its live threads wait at barriers that can never all be reached.
inline bool run_block(unsigned n) {
    for (auto& [p, size] : shared_arrays) memset(p, 0xA5, size);
    memset(filled, 0, sizeof(filled));  // a launch that failed may have left lanes mid-collective
    for (unsigned t = 0; t < n; ++t) {
        Thread& th = threads[t];
        getcontext(&th.ctx);
        th.ctx.uc_stack.ss_sp = stacks.data() + (size_t)t * STACK;
        th.ctx.uc_stack.ss_size = STACK;
        th.ctx.uc_link = &sched;
        makecontext(&th.ctx, trampoline, 0);
        th.idx = {t, 0, 0};
        th.state = RUN;
    }
    order.resize(n);
    for (unsigned t = 0; t < n; ++t) order[t] = t;
    for (;;) {
        if (seed) shuffle(n);
        for (unsigned t : order) {
            if (threads[t].state == RUN) {
                cur = &threads[t];
                swapcontext(&sched, &cur->ctx);
            }
        }
        bool released = false, all_done = true, all_block = true;
        for (unsigned w = 0; w * 32 < n; ++w) {  // a warp whose lanes all wait at a warp barrier goes on
            unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, at_warp = 0;
            for (unsigned t = lo; t < hi; ++t) {
                State st = threads[t].state;
                all_done &= st == DONE;
                all_block &= st == BLOCK_BAR;
                at_warp += st == WARP_BAR;
            }
            if (at_warp == hi - lo) {
                for (unsigned t = lo; t < hi; ++t) threads[t].state = RUN;
                released = true;
            }
        }
        if (released) continue;
        if (all_done) return true;
        if (!all_block) return false;  // some wait where others never come (exited, or at another barrier)
        for (unsigned t = 0; t < n; ++t) threads[t].state = RUN;
    }
}

// 0: done; 1: a barrier that cannot be passed; 2: a launch the GPU would refuse.
inline int launch(unsigned grid, unsigned block, const std::function<void()>& fn) {
    if (grid == 0 || block == 0 || block > 1024 || grid > 0x7FFFFFFFu) return 2;
    threads.assign(block, Thread{});
    if (stacks.size() < (size_t)block * STACK) stacks.resize((size_t)block * STACK);  // kept for the next launch
    body = &fn;
    grid_dim = {grid, 1, 1};
    block_dim = {block, 1, 1};
    std::vector<unsigned> blocks(grid);  // in index order, or shuffled: blocks are not ordered on a GPU
    for (unsigned b = 0; b < grid; ++b) blocks[b] = b;
    for (unsigned i = grid - 1; seed && i > 0; --i) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        unsigned j = (unsigned)(seed % (i + 1)), t = blocks[i];
        blocks[i] = blocks[j];
        blocks[j] = t;
    }
    for (unsigned b : blocks) {
        block_idx = {b, 0, 0};
        if (!run_block(block)) return 1;
    }
    return 0;
}

struct Shared {  // a __shared__ array (tests/cudaemu.py rewrites each declaration): poisoned now and per block
    Shared(void* p, size_t size) {
        shared_arrays.emplace_back(p, size);
        memset(p, 0xA5, size);
    }
};

template <class T>
inline unsigned long long bits_of(T v) {  // the value's bits, as a warp exchanges them (not converted)
    static_assert(sizeof(T) <= 8, "at most 64 bits a lane");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}

template <class T>
inline T exchange(T v, int from) {  // the value lane ``from`` of this warp gave: its own past the warp's end,
    unsigned lane = cur->idx.x & 31, w = cur->idx.x >> 5;  // a poison where that lane has no thread
    slot[w][lane] = bits_of(v);
    filled[w][lane] = true;
    wait(WARP_BAR);
    T got = v;
    if (from >= 0 && from < 32) {
        unsigned long long b = filled[w][from] ? slot[w][from] : 0xA5A5A5A5A5A5A5A5ull;
        memcpy(&got, &b, sizeof(T));
    }
    wait(WARP_BAR);
    filled[w][lane] = false;
    return got;
}

template <class T>
inline unsigned match_any(T v) {
    unsigned lane = cur->idx.x & 31, w = cur->idx.x >> 5;
    slot[w][lane] = bits_of(v);
    filled[w][lane] = true;
    wait(WARP_BAR);
    unsigned m = 0;
    for (int l = 0; l < 32; ++l)
        if (filled[w][l] && slot[w][l] == bits_of(v)) m |= 1u << l;
    wait(WARP_BAR);
    filled[w][lane] = false;
    return m;
}
}  // namespace emu
}  // namespace

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ EMU_cudaemu_py_rewrites_every_shared_declaration  // a declaration it missed fails to compile
#define threadIdx (emu::cur->idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::wait(emu::BLOCK_BAR); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::WARP_BAR); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) { return emu::match_any(v) & mask; }
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    return emu::exchange(v, (int)(emu::cur->idx.x & 31) + (int)delta);
}
template <class T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }
